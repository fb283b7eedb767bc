"""Objectives: per-task scores -> the fitness (or fitness vector) Optuna is told, and score records."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.evaluate import TaskScore, mean_and_stderr
from evomerge.search.config import direction_sign


@dataclass
class Objectives:
    """Tasks with weights and directions; turns per-task scores into the fitness (or fitness vector).

    `tasks` are task files or `search.external` objectives (lm-eval, Python); each has a `name`.
    """

    tasks: list[Any]
    weights: list[float]
    directions: list[str]
    pareto: bool

    @property
    def signs(self) -> list[float]:
        """Per objective, +1 when maximised and -1 when minimised."""
        return [direction_sign(direction) for direction in self.directions]

    @property
    def signed_weights(self) -> list[tuple[str, float]]:
        """(task name, weight) per objective, the weight negated for a minimised one."""
        return [
            (task.name, weight * sign) for task, weight, sign in zip(self.tasks, self.weights, self.signs, strict=True)
        ]

    def fitness(self, scores: Mapping[str, float]) -> float:
        """Weighted sum, with minimised objectives negated, so larger is always better."""
        total = 0.0
        for name, weight in self.signed_weights:
            total += weight * scores[name]
        return total

    def values(self, scores: Mapping[str, float]) -> tuple[float, ...]:
        """What Optuna is told: the fitness, or one value per objective for a Pareto search."""
        if self.pareto:
            return tuple(scores[task.name] for task in self.tasks)
        return (self.fitness(scores),)

    @property
    def study_directions(self) -> list[str]:
        return list(self.directions) if self.pareto else ["maximize"]

    @property
    def metric_names(self) -> list[str]:
        """What each value told to Optuna is (`values`): a task's score, or the weighted fitness."""
        return [task.name for task in self.tasks] if self.pareto else ["fitness"]


def combine_scores(first: TaskScore, rest: TaskScore) -> TaskScore:
    """One task's score over the union of two disjoint example sets."""
    values = first.values + rest.values
    score, stderr = mean_and_stderr(values)
    return TaskScore(
        task=first.task, score=score, stderr=stderr, n=len(values), values=values,
        indices=first.indices + rest.indices, prompt_tokens=first.prompt_tokens + rest.prompt_tokens,
        generated_tokens=first.generated_tokens + rest.generated_tokens, seconds=first.seconds + rest.seconds,
    )


def score_table(scores: Mapping[str, TaskScore], *, per_example: bool = False) -> dict[str, dict[str, Any]]:
    """JSON-ready per-task score, standard error and example count.

    ``per_example`` adds ``values`` in example-index order, so two models scored on the same split can be
    compared pair by pair (test-split tables keep them; search tables stay small).
    """
    table: dict[str, dict[str, Any]] = {}
    for name, s in scores.items():
        row: dict[str, Any] = {
            "score": s.score, "stderr": s.stderr if math.isfinite(s.stderr) else None, "n": s.n, "tokens": s.tokens
        }
        if per_example:
            row["values"] = s.values_in_example_order()
        table[name] = row
    return table
