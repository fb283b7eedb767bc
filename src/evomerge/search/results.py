"""After the search: pick champion, specialists and challengers, and score everyone on the test split.

Selection uses only search-split evidence; the test split is touched once, here, for reporting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evomerge.search.run import SearchRun, score_table


@dataclass(frozen=True)
class Selection:
    """The candidates worth keeping, by trial number."""

    champion: int
    specialists: dict[str, int]
    challengers: list[int]


def fully_evaluated(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials scored on the whole search split (raced-out and duplicate ones excluded)."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("status") == "complete"
    ]


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_set(points: Mapping[int, Sequence[float]]) -> list[int]:
    """Keys of the non-dominated points (all objectives maximised)."""
    return [k for k, p in points.items() if not any(_dominates(q, p) for j, q in points.items() if j != k)]


def select(study: optuna.Study, task_names: Sequence[str], signs: Sequence[float], max_challengers: int = 4) -> Selection:
    """Champion: best fitness; specialists: best per task; challengers: the rest of the Pareto set over
    the per-task scores, the most mutually distant genomes first (diversity)."""
    trials = fully_evaluated(study)
    if not trials:
        raise RuntimeError("no candidate was fully evaluated; raise the budget")
    by_number = {t.number: t for t in trials}
    champion = max(trials, key=lambda t: (t.user_attrs["fitness"], -t.number)).number
    specialists = {}
    for name, sign in zip(task_names, signs, strict=True):
        best = max(trials, key=lambda t: (sign * t.user_attrs["scores"][name]["score"], t.user_attrs["fitness"]))
        specialists[name] = best.number
    points = {
        t.number: [sign * t.user_attrs["scores"][n]["score"] for n, sign in zip(task_names, signs, strict=True)]
        for t in trials
    }
    front = [n for n in pareto_set(points) if n != champion and n not in specialists.values()]
    chosen: list[int] = [champion, *specialists.values()]
    challengers: list[int] = []
    while front and len(challengers) < max_challengers:
        # Greedy max-min distance in genome space keeps the challengers diverse.
        def distance(number: int) -> float:
            return min(_genome_distance(by_number[number], by_number[c]) for c in chosen)

        pick = max(front, key=distance)
        challengers.append(pick)
        chosen.append(pick)
        front.remove(pick)
    return Selection(champion, specialists, challengers)


def _genome_distance(a: optuna.trial.FrozenTrial, b: optuna.trial.FrozenTrial) -> float:
    keys = set(a.params) & set(b.params)
    return math.sqrt(sum((a.params[k] - b.params[k]) ** 2 for k in keys))


def evaluate_on_test(run: SearchRun, selection: Selection) -> dict[str, Any]:
    """Test-split scores of parents, baselines and the selected candidates; stored on the study."""
    session = run.session
    study = run.study
    results: dict[str, Any] = {}
    parents = ([session.base] if session.base else []) + run.genome.merged_models
    for ref in parents:
        session.load_checkpoint(ref)
        results[f"parent:{Path(ref).name}"] = {"kind": "parent", "test": score_table(session.evaluate("test").scores, per_example=True)}
    for name, recipe in run.baseline_recipes().items():
        session.load_streamed(recipe)
        results[name] = {"kind": "baseline", "test": score_table(session.evaluate("test").scores, per_example=True)}
    roles: dict[int, list[str]] = {selection.champion: ["champion"]}
    for task, number in selection.specialists.items():
        roles.setdefault(number, []).append(f"specialist:{task}")
    for number in selection.challengers:
        roles.setdefault(number, []).append("challenger")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number, labels in roles.items():
        trial = trials[number]
        session.load_recipe(session.candidate_of(trial))
        results[f"candidate:{number}"] = {
            "kind": "candidate",
            "roles": labels,
            "trial": number,
            "search": trial.user_attrs["scores"],
            "test": score_table(session.evaluate("test").scores, per_example=True),
        }
    study.set_user_attr("test_results", results)
    study.set_user_attr(
        "selection",
        {"champion": selection.champion, "specialists": selection.specialists, "challengers": selection.challengers},
    )
    return results
