"""What an evaluation returns: per-task scores with standard errors, and the report of one split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskScore:
    """One task's result on one split: mean score, its standard error and per-example values.

    `values[i]` is the value of example `indices[i]` (1.0/0.0 for accuracy scorers, negative mean NLL
    per token for `perplexity`); `outputs[i]` is the stop-truncated generation ("" for log-likelihood).
    """

    task: str
    score: float
    stderr: float
    n: int
    values: list[float]
    indices: list[int]
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    outputs: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Prompt plus generated tokens processed for this task."""
        return self.prompt_tokens + self.generated_tokens

    def values_in_example_order(self) -> list[float]:
        """`values` sorted by example index (an evaluation may score examples sorted by length), so that two
        scores of the same split pair up example by example."""
        return [value for _, value in sorted(zip(self.indices, self.values, strict=True))]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite stderr becomes None)."""
        data = asdict(self)
        if not math.isfinite(data["stderr"]):
            data["stderr"] = None
        return data


@dataclass
class EvalReport:
    """Scores of every evaluated task on one split, by task name."""

    split: str
    scores: dict[str, TaskScore]
    seconds: float

    def __getitem__(self, task: str) -> TaskScore:
        return self.scores[task]

    def mean(self) -> float:
        """Unweighted mean of the task scores (a simple multi-task fitness)."""
        return sum(s.score for s in self.scores.values()) / len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "split": self.split,
            "seconds": self.seconds,
            "tasks": {name: score.to_dict() for name, score in self.scores.items()},
        }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean: sqrt(p(1-p)/n) for 0/1 values, s/sqrt(n) (ddof=1) otherwise.

    With one non-binary value the standard error is undefined and returned as NaN.
    """
    n = len(values)
    mean = sum(values) / n
    if all(v in (0.0, 1.0) for v in values):
        return mean, math.sqrt(mean * (1.0 - mean) / n)
    if n < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)
