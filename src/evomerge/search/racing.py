"""Racing (successive halving) for fitness: score growing slices of the search split, go on only while the
candidate can still enter the top of the population.

The search split of every task is put in a seeded random order once per run; round r scores the examples
between the previous cut and `first_fraction · growth^r` of the split (the last round reaches the whole
split). After each round but the last, a candidate is dropped when even an optimistic bound on its
fitness stays below the k-th best full fitness seen so far. For a task scored 0/1 the bound is the upper
end of the Agresti–Coull interval (centred on the adjusted proportion (x + z²/2)/(n + z²), so it never
collapses at 0% or 100% on a small slice); for other values it is the mean plus z standard errors.
Several tasks combine as the weighted sum of their centres plus z times the combined standard error,
which is exactly the Agresti–Coull bound for one task. benchmarks/racing_drop_rate.py simulates how often
a candidate whose full fitness equals the threshold is wrongly dropped (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RacePlan:
    """A seeded example order per task and the cumulative number of examples scored after each round."""

    order: dict[str, list[int]]
    cuts: list[dict[str, int]]  # one per round, non-decreasing; the last is every task's full size

    @property
    def rounds(self) -> int:
        return len(self.cuts)

    def round_indices(self, r: int) -> dict[str, list[int]]:
        """The examples new in round `r`, per task (tasks with none are left out)."""
        previous = self.cuts[r - 1] if r else {task: 0 for task in self.order}
        slices = {task: sorted(order[previous[task] : self.cuts[r][task]]) for task, order in self.order.items()}
        return {task: indices for task, indices in slices.items() if indices}

    def all_indices(self) -> dict[str, list[int]]:
        """Every example of every task (a race without a threshold scores them in one go)."""
        return {task: sorted(order) for task, order in self.order.items() if order}


def plan_race(sizes: Mapping[str, int], fraction: float, seed: int, growth: float = 2.0) -> RacePlan:
    """Seeded per-task example orders, cut at `fraction · growth^r` of each split (rounds adding nothing are merged)."""
    order: dict[str, list[int]] = {}
    for task, size in sizes.items():
        order[task] = list(range(size))
        random.Random(f"{seed}:{task}").shuffle(order[task])
    cuts: list[dict[str, int]] = []
    share = fraction
    while True:
        cut = {task: max(1, min(size, math.ceil(share * size))) for task, size in sizes.items()}
        if not cuts or cut != cuts[-1]:
            cuts.append(cut)
        if all(cut[task] == size for task, size in sizes.items()):
            return RacePlan(order, cuts)
        share *= growth


def interval_centre_and_stderr(values: Sequence[float], z: float) -> tuple[float, float]:
    """Centre and standard error of a task's mean for racing: Agresti–Coull for 0/1 values, plain otherwise."""
    n = len(values)
    if all(v in (0.0, 1.0) for v in values):
        adjusted_n = n + z * z
        adjusted = (sum(values) + z * z / 2) / adjusted_n
        return adjusted, math.sqrt(adjusted * (1 - adjusted) / adjusted_n)
    mean = sum(values) / n
    if n < 2:
        return mean, math.inf
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def optimistic_bound(values: Mapping[str, Sequence[float]], weights: Mapping[str, float], z: float) -> float:
    """Upper confidence bound of the weighted-sum fitness of per-task partial scores (tasks independent).

    `weights` are signed (a minimised objective has a negative weight), as `Objectives.signed_weights` gives
    them; the Agresti–Coull interval is symmetric about its centre, so a negative weight's bound is right too.
    """
    parts = {task: interval_centre_and_stderr(values[task], z) for task in weights}
    centre = sum(w * parts[task][0] for task, w in weights.items())
    stderr = math.sqrt(sum((w * parts[task][1]) ** 2 for task, w in weights.items()))
    return centre + z * stderr


def entry_threshold(full_fitnesses: Sequence[float], top_k: int) -> float | None:
    """The fitness a candidate must be able to reach to enter the top `top_k` (None: not full yet)."""
    if len(full_fitnesses) < top_k:
        return None
    return sorted(full_fitnesses, reverse=True)[top_k - 1]


def still_competitive(bound: float, threshold: float | None) -> bool:
    """True when the optimistic bound of a partial fitness reaches the entry threshold."""
    return threshold is None or bound >= threshold


def race(
    plan: RacePlan,
    score_round: Callable[[dict[str, list[int]]], Mapping[str, Sequence[float]]],
    weights: Mapping[str, float],
    threshold: float | None,
    z: float,
) -> bool:
    """Score a candidate round by round; True when it was raced out before the last round.

    `score_round(indices)` scores the given examples and returns every task's values **so far** (all
    rounds up to this one), so the caller keeps the evidence. Without a threshold nothing can be dropped,
    so the whole split is scored in one call (fewer, larger batches).
    """
    if threshold is None:
        score_round(plan.all_indices())
        return False
    for r in range(plan.rounds):
        values = score_round(plan.round_indices(r))
        last = r == plan.rounds - 1
        if not last and not still_competitive(optimistic_bound(values, weights, z), threshold):
            return True
    return False
