"""`evolve`: run or resume a search, select its champion, specialists and challengers, score them on test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.search.config import load_evolve_config
from evomerge.search.results import Selection, evaluate_on_test, select
from evomerge.search.run import CandidateResult, SearchRun, prepare_run_dir, write_run_file


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
) -> EvolveOutcome:
    """Run the search described by `config_path` in `run_dir` (resuming it if it exists)."""
    config_path = Path(config_path)
    config, root = load_evolve_config(config_path)
    run_dir = Path(run_dir)
    prepare_run_dir(config_path, config, run_dir)
    run = SearchRun(config, root, run_dir, on_candidate=on_candidate, on_status=on_status)
    study = run.run()
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
