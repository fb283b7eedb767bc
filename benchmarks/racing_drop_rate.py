"""How often does racing wrongly drop a candidate that deserves its place? A Monte-Carlo simulation.

A candidate whose accuracy on the whole search split equals the entry threshold would enter the top k (a
tie), so dropping it is an error. We put its exactly-threshold share of correct answers in a random order
(racing scores random slices of a finite split: hypergeometric draws) and run the real `race` with the
default plan (first round 1/8, growth 2) over many seeds.

    python benchmarks/racing_drop_rate.py [--trials 20000] [--size 300] [--z 2.0]

Prints one line per true accuracy and ends with `wrong drops: max X.X% at z = Z (target <= 2.5%)`.
"""

from __future__ import annotations

import argparse
import random

from evomerge.search.config import Racing
from evomerge.search.racing import plan_race, race


def wrong_drop_rate(accuracy: float, size: int, z: float, trials: int, seed: int = 0) -> float:
    """Share of `trials` in which a candidate at exactly the threshold is raced out."""
    defaults = Racing()
    plan = plan_race({"t": size}, defaults.first_fraction, seed=0, growth=defaults.growth)
    correct = round(accuracy * size)
    threshold = correct / size
    rng = random.Random(seed)
    drops = 0
    for _ in range(trials):
        values = [1.0] * correct + [0.0] * (size - correct)
        rng.shuffle(values)
        seen: list[float] = []

        def score_round(indices: dict[str, list[int]], values: list[float] = values, seen: list[float] = seen):
            seen.extend(values[i] for i in indices["t"])
            return {"t": seen}

        drops += race(plan, score_round, {"t": 1.0}, threshold, z)
    return drops / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=300, help="search-split size (the demo's target: 300)")
    parser.add_argument("--z", type=float, default=Racing().confidence)
    args = parser.parse_args()
    worst = 0.0
    for accuracy in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95):
        rate = wrong_drop_rate(accuracy, args.size, args.z, args.trials)
        worst = max(worst, rate)
        standard_error = (rate * (1 - rate) / args.trials) ** 0.5
        print(f"true accuracy = threshold = {accuracy:.2f}: wrongly dropped {100 * rate:.2f}% ± {100 * standard_error:.2f}%")
    print(f"wrong drops: max {100 * worst:.1f}% at z = {args.z} (target <= 2.5%)")


if __name__ == "__main__":
    main()
