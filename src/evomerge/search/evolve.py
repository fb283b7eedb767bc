"""`evolve`: run or resume a search, select its champion, specialists and challengers, score them on test."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.config import load_evolve_config
from evomerge.search.integrity import check_parents, parent_refs
from evomerge.search.results import Selection, evaluate_on_test, select
from evomerge.search.run import CandidateResult, SearchRun, prepare_run_dir, write_run_file
from evomerge.search.worker import run_with_workers


@dataclass(frozen=True)
class EvolveOutcome:
    """A finished run: where it lives, what was selected, and every test-split result."""

    run_dir: Path
    selection: Selection
    test_results: dict[str, Any]
    candidates: int
    examples_saved: int


def evolve(
    config_path: str | Path,
    run_dir: str | Path,
    *,
    on_candidate: Callable[[CandidateResult], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    workers: int = 1,
    accept_changed_parents: bool = False,
) -> EvolveOutcome:
    """Run the search described by `config_path` in `run_dir` (resuming it if it exists).

    `workers > 1` evaluates candidates in that many `evomerge worker` processes sharing the study. A
    resumed run whose parents changed on disk is refused unless `accept_changed_parents`.
    """
    config_path = Path(config_path)
    config, root = load_evolve_config(config_path)
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    prepare_run_dir(config, run_dir)
    try:
        check_parents(run_dir, parent_refs(config, root), allow_pickle=config.allow_pickle,
                      accept_changed=accept_changed_parents)
        run = SearchRun(config, root, run_dir, on_candidate=on_candidate, on_status=on_status)
    except EvomergeError:
        if fresh:  # refused before any candidate ran: leave no half-made run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    study = run.run() if workers == 1 else run_with_workers(run, workers, on_status=on_status)
    if on_status is not None:
        on_status("scoring parents, baselines and the selected candidates on the test split")
    objectives = run.session.objectives
    signs = [1.0 if d == "maximize" else -1.0 for d in objectives.directions]
    selection = select(study, [t.name for t in objectives.tasks], signs)
    test_results = evaluate_on_test(run, selection)
    trials = run.finished_trials()
    saved = sum(t.user_attrs.get("examples_saved", 0) for t in trials)
    write_run_file(
        run_dir,
        {
            "name": config.name,
            "candidates": len(trials),
            "examples_saved_by_racing": saved,
            "selection": study.user_attrs["selection"],
            "baselines_search": study.user_attrs.get("baselines"),
            "test_results": test_results,
        },
    )
    return EvolveOutcome(run_dir, selection, test_results, len(trials), saved)
