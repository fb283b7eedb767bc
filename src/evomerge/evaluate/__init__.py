"""Declarative tasks, scorers and the fast batched evaluation engine (see docs/ARCHITECTURE.md)."""

from evomerge.evaluate.engine import Evaluator, default_dtype
from evomerge.evaluate.loading import is_image_text_model, load_causal_lm, resolve_device
from evomerge.evaluate.report import EvalReport, TaskScore, mean_and_stderr
from evomerge.evaluate.scorers import (
    GenerativeScorer,
    LoglikScorer,
    ScorerSpec,
    charset_ok,
    get_scorer_spec,
    last_number,
    numbers_equal,
    register_scorer,
    scorer_names,
    truncate_at_stop,
)
from evomerge.evaluate.task import SPLITS, Task, TaskSpec, check_split, load_task

__all__ = [
    "SPLITS",
    "EvalReport",
    "Evaluator",
    "GenerativeScorer",
    "LoglikScorer",
    "ScorerSpec",
    "Task",
    "TaskScore",
    "TaskSpec",
    "charset_ok",
    "check_split",
    "default_dtype",
    "evaluate_lm_eval",
    "get_scorer_spec",
    "is_image_text_model",
    "last_number",
    "load_causal_lm",
    "load_task",
    "mean_and_stderr",
    "numbers_equal",
    "register_scorer",
    "resolve_device",
    "scorer_names",
    "truncate_at_stop",
]


def __getattr__(name: str):
    # lm-eval is an optional extra and slow to import: load the adapter only when asked for.
    if name == "evaluate_lm_eval":
        from evomerge.evaluate.lmeval import evaluate_lm_eval

        return evaluate_lm_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
