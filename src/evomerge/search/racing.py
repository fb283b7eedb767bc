"""Racing (successive halving) for fitness: score a slice of the search split first, go on only if the
candidate can still enter the top of the population.

A candidate is dropped after its first slice when even an optimistic bound on its fitness,
`partial + z · stderr`, stays below the k-th best full fitness seen so far. For 0/1 scores the standard
error uses the Agresti–Coull estimate, which stays positive at 0% or 100% on a small slice, so a
candidate is never dropped on the strength of a few lucky or unlucky examples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RacePlan:
    """Which search-split examples each task scores in the first round, and which afterwards."""

    first: dict[str, list[int]]
    rest: dict[str, list[int]]

    def size(self, part: Mapping[str, list[int]]) -> int:
        return sum(len(indices) for indices in part.values())


def plan_race(sizes: Mapping[str, int], fraction: float, seed: int) -> RacePlan:
    """Split every task's examples into a seeded random first slice and the rest."""
    first: dict[str, list[int]] = {}
    rest: dict[str, list[int]] = {}
    for task, size in sizes.items():
        order = list(range(size))
        random.Random(f"{seed}:{task}").shuffle(order)
        cut = max(1, min(size, math.ceil(fraction * size)))
        first[task] = sorted(order[:cut])
        rest[task] = sorted(order[cut:])
    return RacePlan(first, rest)


def optimistic_stderr(values: Sequence[float]) -> float:
    """Standard error of a mean for racing: Agresti–Coull for 0/1 values, sample error otherwise."""
    n = len(values)
    if all(v in (0.0, 1.0) for v in values):
        adjusted = (sum(values) + 2) / (n + 4)
        return math.sqrt(adjusted * (1 - adjusted) / (n + 4))
    if n < 2:
        return math.inf
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def entry_threshold(full_fitnesses: Sequence[float], top_k: int) -> float | None:
    """The fitness a candidate must be able to reach to enter the top `top_k` (None: not full yet)."""
    if len(full_fitnesses) < top_k:
        return None
    return sorted(full_fitnesses, reverse=True)[top_k - 1]


def still_competitive(partial: float, stderr: float, threshold: float | None, z: float) -> bool:
    """True when the optimistic bound of a partial fitness reaches the entry threshold."""
    return threshold is None or partial + z * stderr >= threshold
