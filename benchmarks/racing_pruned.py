"""Does racing, with raced-out candidates told to Optuna as PRUNED, slow the search down?

CMA-ES ignores pruned trials, so a raced-out candidate costs its partial evaluation and teaches the sampler
nothing; a generation only closes once `population` candidates completed. That could make the search need
more candidates to reach the same quality. This script runs the demo's search (the tiny zoo, DARE-TIES
over the three specialists, CMA-ES from `start: init`) with racing on and off, the same candidate budget
and search seed, and compares: examples evaluated, the champion's search fitness, and the champion's score
on the target's test split, paired on the same test examples (exact McNemar).

    python benchmarks/racing_pruned.py --seeds 0 1 2 --candidates 200 --out /tmp/racing-pruned

Prints a Markdown table (one row per seed and arm, then the paired racing-on minus racing-off comparison)
and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from evomerge.evaluate.stats import paired_comparison
from evomerge.pipelines import evolve
from evomerge.pipelines.demo import demo_config
from evomerge.search.store import find_trial, load_run
from evomerge.zoo import build_zoo, default_zoo_dir

ARMS = ("racing", "no_racing")


def one_search(zoo, out: Path, *, seed: int, candidates: int, racing: bool) -> dict:
    """One demo-style search; returns its cost and its champion's search and test results."""
    config = demo_config(zoo, candidates=candidates, seed=seed)
    config["racing"] = {"enabled": racing}
    out.mkdir(parents=True, exist_ok=True)
    (out / "evolve.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    outcome = evolve(out / "evolve.yaml", out / "run")
    _, store = load_run(outcome.run_dir)
    candidates_only = [r for r in store.trials() if r.examples is not None and r.status != "DUPLICATE"]
    champion = outcome.test_results[f"candidate:{outcome.selection.champion}"]
    test = champion["test"][zoo.target_task.stem]
    return {
        "examples": sum(r.examples or 0 for r in candidates_only),
        "raced_out": sum(r.status == "raced_out" for r in candidates_only),
        "champion_search": find_trial(store, str(outcome.selection.champion)).fitness,
        "champion_test": test["score"],
        "test_values": test["values"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    zoo = build_zoo(default_zoo_dir("tiny", args.zoo_seed), seed=args.zoo_seed)
    rows = {}
    for seed in args.seeds:
        for arm in ARMS:
            rows[(seed, arm)] = one_search(
                zoo, args.out / f"seed{seed}-{arm}", seed=seed, candidates=args.candidates, racing=arm == "racing"
            )
            print(f"seed {seed} {arm}: done", file=sys.stderr, flush=True)
    print("| seed | arm | examples evaluated | raced out (PRUNED) | champion search | champion test |")
    print("|---|---|---|---|---|---|")
    for (seed, arm), row in rows.items():
        print(
            f"| {seed} | {arm} | {row['examples']:,} | {row['raced_out']} | {row['champion_search']:.3f} "
            f"| {row['champion_test']:.3f} |"
        )
    print()
    print("| seed | examples ratio off/on | test: racing − no racing (95% CI, p) |")
    print("|---|---|---|")
    comparisons = {}
    for seed in args.seeds:
        on, off = rows[(seed, "racing")], rows[(seed, "no_racing")]
        comparison = paired_comparison(on["test_values"], off["test_values"])
        comparisons[seed] = comparison.to_dict()
        low, high = comparison.ci95
        print(
            f"| {seed} | {off['examples'] / on['examples']:.2f}x | {comparison.difference:+.3f} "
            f"({low:+.3f} to {high:+.3f}, p {comparison.p_value:.2g}) |"
        )
    saving = statistics.mean(rows[(s, "no_racing")]["examples"] / rows[(s, "racing")]["examples"] for s in args.seeds)
    delta = statistics.mean(rows[(s, "racing")]["champion_test"] - rows[(s, "no_racing")]["champion_test"] for s in args.seeds)
    print(f"\nracing with PRUNED trials: {saving:.2f}x fewer examples, champion test delta {delta:+.3f} (mean over seeds)")
    (args.out / "results.json").write_text(json.dumps(
        {"rows": {f"{s}/{a}": {k: v for k, v in r.items() if k != "test_values"} for (s, a), r in rows.items()},
         "comparisons": comparisons}, indent=2,
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
