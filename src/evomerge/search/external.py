"""Objectives scored outside evomerge's own evaluator: lm-eval tasks and a Python objective function.

Each one looks to the search like a task: a name, a number of examples per split, and a `TaskScore` for
the live model on some of them (`indices` are positions in the split, as for our own tasks, so racing
and paired statistics treat them alike).

- `lm_eval:NAME` (`LmEvalObjective`): an lm-eval task through `evaluate.lmeval`. Search and test are two
  lm-eval splits the config names (`search_split`, `test_split`), or one split (`split`, default the task's
  own evaluation split) divided by a seeded shuffle into `search_fraction` and the rest.
- `python:KEY` (`PythonObjective`): key KEY of the dict a Python function returns for the live model,
  `function(model, tokenizer) -> {KEY: float, ...}` (Optuna's objective pattern). One function serves
  every `python:` objective and is called once per evaluation; it counts as a single example, so racing
  scores it in its first round. A function with a `split` parameter is told "search" or "test".
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.evaluate import Task, TaskScore, load_task
from evomerge.search.config import LM_EVAL_PREFIX, PYTHON_PREFIX, Objective, resolve_path

ObjectiveFunction = Callable[..., Mapping[str, float]]


class LmEvalObjective:
    """An lm-eval task as an objective: documents per split, scored on the live model."""

    def __init__(self, objective: Objective, root: Path, *, seed: int, batch_size: int):
        from evomerge.evaluate.lmeval import open_lm_eval_task  # lm-eval is optional and slow to import

        self.task_name = objective.task.removeprefix(LM_EVAL_PREFIX)
        self.name = objective.key
        self.objective = objective
        self.batch_size = batch_size
        include = resolve_path(objective.include_path, root) if objective.include_path else None
        self.include_path = include
        # lm-eval's ~thousands of built-in tasks are indexed only when no local directory is given.
        options = {"include_path": include, "include_defaults": include is None}
        if objective.search_split is not None:
            self.tasks = {split: open_lm_eval_task(self.task_name, split=name, **options)
                          for split, name in (("search", objective.search_split), ("test", objective.test_split))}
            self.docs = {split: list(range(len(task.eval_docs))) for split, task in self.tasks.items()}
        else:
            task = open_lm_eval_task(self.task_name, split=objective.split, **options)
            order = list(range(len(task.eval_docs)))
            random.Random(f"{seed}:{self.task_name}").shuffle(order)
            cut = round(objective.search_fraction * len(order))
            self.tasks = {"search": task, "test": task}
            self.docs = {"search": sorted(order[:cut]), "test": sorted(order[cut:])}
        for split, docs in self.docs.items():
            if not docs:
                raise ConfigError(f"objective {objective.task}: its {split} split has no documents")

    def size(self, split: str) -> int:
        return len(self.docs[split])

    def score(self, model: Any, tokenizer: Any, split: str, indices: Sequence[int] | None) -> TaskScore:
        """The task's score on `indices` (positions in the split; all when None)."""
        from evomerge.evaluate.lmeval import evaluate_lm_eval

        docs = self.docs[split]
        chosen = [docs[i] for i in (range(len(docs)) if indices is None else indices)]
        report = evaluate_lm_eval(
            model, tokenizer, [self.tasks[split]], samples={self.task_name: chosen}, batch_size=self.batch_size,
            metric=self.objective.metric, num_fewshot=self.objective.num_fewshot,
        )
        score = report.scores[self.task_name]
        position = {doc: i for i, doc in enumerate(docs)}
        return replace(score, task=self.name, indices=[position[doc] for doc in score.indices])

    def evidence(self, weight: float, direction: str) -> dict[str, Any]:
        """The suite entry: which documents the run scores on, by content."""
        digest = hashlib.sha256()
        for split in ("search", "test"):
            task = self.tasks[split]
            for doc in self.docs[split]:
                digest.update(f"{split}:{json.dumps(task.eval_docs[doc], sort_keys=True, default=str)}".encode())
        return {
            "name": self.name, "path": self.objective.task + (f" ({self.include_path})" if self.include_path else ""),
            "fingerprint": digest.hexdigest(), "scorer": "lm-eval",
            "n": {split: self.size(split) for split in ("search", "test")}, "weight": weight, "direction": direction,
        }


class PythonObjective:
    """One key of a Python objective function's result."""

    def __init__(self, objective: Objective, function: ObjectiveFunction):
        self.name = objective.key
        self.key = objective.task.removeprefix(PYTHON_PREFIX)
        self.objective = objective
        self.function = function

    def size(self, split: str) -> int:
        return 1

    def evidence(self, weight: float, direction: str) -> dict[str, Any]:
        try:
            source = inspect.getsource(self.function)
        except (OSError, TypeError):  # defined interactively: its name is all there is
            source = ""
        name = f"{getattr(self.function, '__module__', '')}.{getattr(self.function, '__qualname__', repr(self.function))}"
        return {
            "name": self.name, "path": f"{self.objective.task} ({name})",
            "fingerprint": hashlib.sha256((name + "\0" + source).encode()).hexdigest(), "scorer": "python",
            "n": {"search": 1, "test": 1}, "weight": weight, "direction": direction,
        }


def call_objective_function(function: ObjectiveFunction, model: Any, tokenizer: Any, split: str,
                            keys: Sequence[str]) -> dict[str, float]:
    """The function's scores for the live model; a result without every declared key is a `ConfigError`
    (the run cannot go on), a non-finite value a `ValueError` (that candidate fails)."""
    accepts_split = "split" in inspect.signature(function).parameters
    result = function(model, tokenizer, split=split) if accepts_split else function(model, tokenizer)
    if not isinstance(result, Mapping):
        raise ConfigError(f"the objective function returned {type(result).__name__}, not a dict of scores")
    missing = [key for key in keys if key not in result]
    if missing:
        raise ConfigError(
            f"the objective function returned {sorted(map(str, result))}, without {missing}, which the config's "
            "objectives name as python:KEY"
        )
    scores = {key: float(result[key]) for key in keys}
    bad = {key: value for key, value in scores.items() if not math.isfinite(value)}
    if bad:
        raise ValueError(f"the objective function returned non-finite scores {bad}")
    return scores


def python_scores(objectives: Sequence[PythonObjective], model: Any, tokenizer: Any, split: str) -> dict[str, TaskScore]:
    """Every `python:` objective's `TaskScore` from one call of their function (one example each)."""
    started = time.perf_counter()
    scores = call_objective_function(objectives[0].function, model, tokenizer, split, [o.key for o in objectives])
    seconds = time.perf_counter() - started
    return {
        o.name: TaskScore(task=o.name, score=scores[o.key], stderr=math.nan, n=1, values=[scores[o.key]],
                          indices=[0], prompt_tokens=0, generated_tokens=0, seconds=seconds)
        for o in objectives
    }


def open_objectives(
    objectives: Sequence[Objective], root: Path, function: ObjectiveFunction | None, *, seed: int, batch_size: int
) -> list[Task | LmEvalObjective | PythonObjective]:
    """The config's objectives, opened in order: task files, lm-eval tasks and Python function keys."""
    declared = [o for o in objectives if o.task.startswith(PYTHON_PREFIX)]
    if declared and function is None:
        raise ConfigError(
            f"objective {declared[0].task} needs a Python objective function: "
            "evomerge.evolve(config, run_dir, objective=function)"
        )
    if function is not None and not declared:
        raise ConfigError("an objective function was given but no objective names one of its keys as python:KEY")
    opened: list[Task | LmEvalObjective | PythonObjective] = []
    for objective in objectives:
        if objective.task.startswith(LM_EVAL_PREFIX):
            opened.append(LmEvalObjective(objective, root, seed=seed, batch_size=batch_size))
        elif objective.task.startswith(PYTHON_PREFIX):
            assert function is not None
            opened.append(PythonObjective(objective, function))
        else:
            opened.append(load_task(resolve_path(objective.task, root)))
    return opened
