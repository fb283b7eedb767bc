"""lm-evaluation-harness adapter: standard benchmarks as objectives, on a model already in memory.

Optional extra (`pip install 'evomerge[lmeval]'`); lm-eval is imported only when this runs. The
result has the same `TaskScore` shape as our own tasks, so the search treats both alike.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.errors import TaskError
from evomerge.evaluate.engine import EvalReport, TaskScore, mean_and_stderr
from evomerge.evaluate.offline import datasets_offline


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        # Before lm-eval imports `datasets`: a task whose data is not on this machine fails, never downloads.
        datasets_offline()
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TaskError("lm-eval tasks need the optional extra: pip install 'evomerge[lmeval]'") from None
    return lm_eval, HFLM, TaskManager


def _metric_value(sample: dict[str, Any], metric: str) -> float:
    value = sample[metric]
    # Corpus-level metrics (e.g. perplexity) keep a tuple per sample; the first item is the score.
    if isinstance(value, list | tuple):
        value = value[0]
    return float(value)


def _task_score(
    name: str, samples: list[dict[str, Any]], metric: str, higher_is_better: bool, seconds: float
) -> TaskScore:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    sign = 1.0 if higher_is_better else -1.0  # keep "higher is better" for every objective
    values = [sign * _metric_value(s, metric) for s in samples]
    score, stderr = mean_and_stderr(values)
    return TaskScore(
        task=name,
        score=score,
        stderr=stderr,
        n=len(values),
        values=values,
        indices=[int(s["doc_id"]) for s in samples],
        prompt_tokens=0,  # lm-eval does not report token counts
        generated_tokens=0,
        seconds=seconds,
        outputs=[],
    )


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """lm-eval's task index, built once per process: indexing its built-in tasks reads ~13,000 YAML files
    (30 s on 2 cores), which `simple_evaluate` would otherwise repeat on every call."""
    _, _, task_manager_class = _import_lm_eval()
    # lm-eval logs every task it indexes; its own `verbosity=` arguments are deprecated for this.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return task_manager_class(include_path=include_path, include_defaults=include_defaults)


def _check_known(manager: Any, name: str) -> None:
    known = set(manager.all_tasks)
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]!r}" if close else ""
        raise TaskError(f"lm-eval task {name!r} is not known to lm-eval{hint}")


def open_lm_eval_task(
    name: str, *, include_path: str | os.PathLike[str] | None = None, include_defaults: bool = True,
    split: str | None = None,
) -> Any:
    """The lm-eval task object `name`, its data loaded from this machine, evaluating `split` (default: the
    task's own test split, else its validation split). `task.eval_docs` are then the documents scored.

    A task whose data is not on this machine is a `TaskError` (downloads are disabled), as is a `split`
    its dataset lacks.
    """
    manager = _task_manager(None if include_path is None else str(include_path), include_defaults)
    _check_known(manager, name)
    try:
        task = manager.load(name)["tasks"][name]
    except OSError as error:  # ConnectionError, offline-mode and not-found errors are all OSErrors
        reason = " ".join(str(error).split())[:160]
        raise TaskError(
            f"lm-eval task {name!r} needs data that is not on this machine and evomerge does not download "
            f"(HF_DATASETS_OFFLINE=1); fetch it once with `datasets` or use a local task via include_path ({reason})"
        ) from None
    if split is not None:
        available = list(task.dataset) if task.dataset is not None else []
        if split not in available:
            raise TaskError(f"lm-eval task {name!r} has no split {split!r} (it has {', '.join(available) or 'none'})")
        # lm-eval scores the test split when a task names one: pointing it at `split` selects the documents.
        task.config.test_split = split
    return task


def evaluate_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | Any],
    *,
    include_path: str | os.PathLike[str] | None = None,
    include_defaults: bool = True,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    metric: str | None = None,
    samples: Mapping[str, Sequence[int]] | None = None,
) -> EvalReport:
    """Run lm-eval `tasks` on the in-memory `model`; one `TaskScore` per task (values per document).

    `tasks` are names or task objects from `open_lm_eval_task`. `include_path` adds local task YAMLs
    (data must be local too: nothing is downloaded here). `samples` scores only those document ids per
    task (instead of `limit`). `metric` picks the per-document metric (default: the task's first); a
    lower-is-better metric is negated so that every score is higher-is-better.
    """
    lm_eval, hflm_class, _ = _import_lm_eval()
    tasks = [open_lm_eval_task(t, include_path=include_path, include_defaults=include_defaults)
             if isinstance(t, str) else t for t in tasks]
    names = [task.task_name for task in tasks]
    lm = hflm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    started = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=_task_manager(None, False),  # the tasks are loaded: an empty index, not the default one
        limit=limit,
        samples=None if samples is None else {name: list(ids) for name, ids in samples.items()},
        num_fewshot=num_fewshot,
        log_samples=True,
        bootstrap_iters=0,  # we compute the standard error from the per-document values ourselves
    )
    seconds = time.perf_counter() - started
    scores = {}
    for name in names:
        samples_of = results["samples"][name]
        higher = results["higher_is_better"][name]
        chosen = metric or next(iter(higher))
        if chosen not in higher:
            raise TaskError(f"lm-eval task {name!r} has no metric {chosen!r} (it has {', '.join(higher)})")
        # Seconds are for the whole lm-eval run: it interleaves tasks, so a per-task split is not known.
        scores[name] = _task_score(name, samples_of, chosen, bool(higher[chosen]), seconds)
    return EvalReport("lm-eval", scores, seconds)


__all__ = ["evaluate_lm_eval", "open_lm_eval_task"]
