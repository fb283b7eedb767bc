"""After the search: pick champion, specialists and challengers, and score everyone on the test split.

Selection uses only search-split evidence; the test split is touched once, here, for reporting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError
from evomerge.search.baselines import baselines_on_test
from evomerge.search.objectives import score_table
from evomerge.search.session import Session
from evomerge.search.store import RunStore, TrialRecord, champion


@dataclass(frozen=True)
class Selection:
    """The candidates worth keeping, by trial number."""

    champion: int
    specialists: dict[str, int]
    challengers: list[int]


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_set(points: Mapping[int, Sequence[float]]) -> list[int]:
    """Keys of the non-dominated points (all objectives maximised)."""
    return [k for k, p in points.items() if not any(_dominates(q, p) for j, q in points.items() if j != k)]


def select(store: RunStore, task_names: Sequence[str], signs: Sequence[float], max_challengers: int = 4) -> Selection:
    """Champion: best fitness; specialists: best per task; challengers: the rest of the Pareto set over
    the per-task scores, the most mutually distant genomes first (diversity)."""
    trials = store.fully_evaluated()
    best = champion(trials)
    if best is None:
        failures = [r.failure for r in store.trials() if r.failure]
        reason = f" ({len(failures)} failed, e.g. {failures[0]})" if failures else ""
        raise ConfigError(
            f"no candidate was fully evaluated{reason}; check the genome's bounds and the parents, or raise the budget"
        )
    by_number = {t.number: t for t in trials}
    specialists = {}
    for name, sign in zip(task_names, signs, strict=True):
        specialists[name] = max(trials, key=lambda t: (sign * t.score(name), t.fitness)).number
    points = {t.number: [sign * t.score(n) for n, sign in zip(task_names, signs, strict=True)] for t in trials}
    front = [n for n in pareto_set(points) if n != best and n not in specialists.values()]
    chosen: list[int] = [best, *specialists.values()]
    challengers: list[int] = []
    while front and len(challengers) < max_challengers:
        # Greedy max-min distance in genome space keeps the challengers diverse.
        def distance(number: int) -> float:
            return min(_genome_distance(by_number[number], by_number[c]) for c in chosen)

        pick = max(front, key=distance)
        challengers.append(pick)
        chosen.append(pick)
        front.remove(pick)
    return Selection(best, specialists, challengers)


def _genome_distance(a: TrialRecord, b: TrialRecord) -> float:
    keys = set(a.params) & set(b.params)
    return math.sqrt(sum((a.params[k] - b.params[k]) ** 2 for k in keys))


def evaluate_on_test(session: Session, store: RunStore, selection: Selection) -> dict[str, Any]:
    """Test-split scores of parents, baselines and the selected candidates (the caller records them)."""
    results = baselines_on_test(session)
    roles: dict[int, list[str]] = {selection.champion: ["champion"]}
    for task, number in selection.specialists.items():
        roles.setdefault(number, []).append(f"specialist:{task}")
    for number in selection.challengers:
        roles.setdefault(number, []).append("challenger")
    trials = {t.number: t for t in store.trials()}
    for number, labels in roles.items():
        trial = trials[number]
        session.activate_candidate(session.candidate_of(trial))
        results[f"candidate:{number}"] = {
            "kind": "candidate",
            "roles": labels,
            "trial": number,
            "search": trial.scores,
            "test": score_table(session.evaluate("test").scores, per_example=True),
        }
    return results
