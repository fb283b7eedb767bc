"""`evolve`: run or resume a search, select its champion, specialists and challengers, score them on test.

A flow on top of the search: for a PS+DFS run it first exports the parameter-space run's champion
(a release packet, `lineage`) that becomes model A of the layer paths; after the search it records the
selection and the test-split results in the run store and writes `run.json`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, EvomergeError
from evomerge.lineage import export_candidate
from evomerge.models import LINEAGE_FILE
from evomerge.search import store as runs
from evomerge.search.baselines import record_reference_trials
from evomerge.search.config import EvolveConfig, load_evolve_config, parse_evolve_config, resolve_path
from evomerge.search.coordination import exclusive_run
from evomerge.search.external import ObjectiveFunction
from evomerge.search.integrity import parent_refs, verify_parents_unchanged
from evomerge.search.results import Selection, evaluate_on_test, select
from evomerge.search.run import CandidateResult, SearchRun
from evomerge.search.worker import run_with_workers


@dataclass(frozen=True)
class EvolveOutcome:
    """A finished run: where it lives, what was selected, and every test-split result."""

    run_dir: Path
    selection: Selection
    test_results: dict[str, Any]
    candidates: int
    examples_saved: int


def export_ps_champion(config: EvolveConfig, root: Path) -> Path | None:
    """For a PS+DFS run, export the `dfs.ps_run` champion into `<ps_run>/dfs_model_a` (once; a stale
    export is refused by `search.dfs.ps_champion_source`, which the session then reads)."""
    if config.dfs is None or config.dfs.ps_run is None:
        return None
    ps_run = Path(resolve_path(config.dfs.ps_run, root))
    out = ps_run / runs.PS_CHAMPION_DIR
    config_ps, store = runs.load_run(ps_run)
    if config_ps.dfs is None and store.selection is not None and not (out / LINEAGE_FILE).is_file():
        export_candidate(ps_run, "champion", out, license=config.license)
    return out


def evolve(
    config: EvolveConfig | str | Path,
    run_dir: str | Path,
    *,
    objective: ObjectiveFunction | None = None,
    root: str | Path | None = None,
    on_candidate: Callable[[CandidateResult], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    workers: int = 1,
    accept_changed_parents: bool = False,
) -> EvolveOutcome:
    """Run the search that `config` describes in `run_dir` (resuming it if it exists).

    `config` is an `EvolveConfig` or the path of its YAML file; relative paths in it are relative to the
    file's directory, or for a config object to `root` (default: the current directory). `objective`,
    `function(model, tokenizer) -> {KEY: float}`, scores the config's `python:KEY` objectives (see
    `search.external`). `workers > 1` evaluates candidates in that many `evomerge worker` processes sharing
    the study. A resumed run whose parents changed on disk is refused unless `accept_changed_parents`.
    """
    if isinstance(config, EvolveConfig):
        # A config built in Python gets the same semantic checks (parents, task files) as a loaded one.
        config, root = parse_evolve_config(config.model_dump(mode="json", exclude_unset=True),
                                           source="evolve config", root=Path(root or Path.cwd()).resolve())
    else:
        config, root = load_evolve_config(config)
    if objective is not None and workers > 1:
        raise ConfigError("a Python objective function runs in this process only; use workers=1 with it")
    run_dir = Path(run_dir)
    fresh = not run_dir.exists()
    runs.prepare_run_dir(config, run_dir)
    with exclusive_run(run_dir):
        return _evolve(config, root, run_dir, fresh, on_candidate, on_status, workers, accept_changed_parents,
                       objective)


def _evolve(
    config: EvolveConfig, root: Path, run_dir: Path, fresh: bool,
    on_candidate: Callable[[CandidateResult], None] | None, on_status: Callable[[str], None] | None,
    workers: int, accept_changed_parents: bool, objective: ObjectiveFunction | None,
) -> EvolveOutcome:
    run = None
    try:
        verify_parents_unchanged(run_dir, parent_refs(config, root), allow_pickle=config.allow_pickle,
                                 accept_changed=accept_changed_parents)
        export_ps_champion(config, root)
        run = SearchRun(config, root, run_dir, on_candidate=on_candidate, on_status=on_status,
                        objective_function=objective)
        study = run.run() if workers == 1 else run_with_workers(run, workers, on_status=on_status)
        objectives = run.session.objectives
        store = runs.RunStore(study)
        selection = select(store, [t.name for t in objectives.tasks], objectives.signs)
    except EvomergeError:
        # A fresh run that produced no usable candidate (a bad `fixed:` value is only noticed when the
        # baselines merge; bounds that overflow every candidate) leaves nothing behind, so the corrected
        # config can start in the same place.
        if fresh and (run is None or not hasattr(run, "store") or not run.store.fully_evaluated()):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if on_status is not None:
        on_status("scoring parents, baselines and the selected candidates on the test split")
    test_results = evaluate_on_test(run.session, store, selection)
    store.set_test_results(test_results)
    store.set_selection(selection.champion, selection.specialists, selection.challengers)
    trials = run.finished_trials()
    if len(trials) >= config.budget.candidates:  # no sampler asks again, so none can learn from them
        record_reference_trials(store, store.baselines or {}, run.session.objectives)
    saved = sum(t.examples_saved or 0 for t in trials)
    runs.write_run_file(
        run_dir,
        {
            "name": config.name,
            "candidates": len(trials),
            "examples_saved_by_racing": saved,
            "selection": store.selection,
            "baselines_search": store.baselines,
            "test_results": test_results,
        },
    )
    return EvolveOutcome(run_dir, selection, test_results, len(trials), saved)
