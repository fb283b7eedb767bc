"""Baselines: the parents alone and untuned merges, scored once per run, and the warm start they give."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.evaluate import EvalReport
from evomerge.search.objectives import score_table
from evomerge.search.session import CANDIDATE_FAILURES, Session, failure_reason
from evomerge.search.store import RunStore


def evaluate_baselines(session: Session, store: RunStore, status: Callable[[str], None]) -> dict[str, Any]:
    """Search-split scores of the parents and untuned merges, stored in the run (once per run)."""
    stored = store.baselines
    if stored is not None:
        return stored
    baselines: dict[str, Any] = {}
    for ref in session.parents():
        status(f"baseline: parent {Path(ref).name}")
        session.activate_parent(ref)
        baselines[f"parent:{Path(ref).name}"] = _record(session, session.evaluate("search"), "parent", ref=ref)
    for name, candidate in session.baselines().items():
        status(f"baseline: {name}")
        text = session.candidate_text(candidate)
        try:  # an untuned merge that fails is recorded as failed, as a candidate would be; the search goes on
            session.activate_baseline(candidate)
            baselines[name] = _record(session, session.evaluate("search"), "untuned", text=text)
        except CANDIDATE_FAILURES as error:
            baselines[name] = {"kind": "untuned", "ref": None, "recipe": text, "search": {}, "fitness": None,
                               "failure": failure_reason(error)}
    for name, genome in session.parent_genomes().items():
        baselines[name]["genome"] = genome
    store.set_baselines(baselines)
    return baselines


def _record(session: Session, report: EvalReport, kind: str, *, ref: str | None = None, text: str | None = None):
    scores = {name: s.score for name, s in report.scores.items()}
    return {
        "kind": kind,
        "ref": ref,
        "recipe": text,
        # Per-example values where an estimated fitness chooses its anchors from them and fits its IRT on them.
        "search": score_table(report.scores, per_example=session.config.fitness.estimator != "full"),
        "fitness": session.objectives.fitness(scores),
    }


def warm_start(session: Session, baselines: Mapping[str, Any]) -> dict[str, float] | None:
    """`start: best_baseline`: the best baseline the genome can express, else the genome's initial values."""
    expressible = {name: b for name, b in baselines.items() if "genome" in b and b["fitness"] is not None}
    if not expressible:
        return session.genome.initial()
    best = max(expressible.values(), key=lambda b: b["fitness"])
    return best["genome"]


def baselines_on_test(session: Session) -> dict[str, Any]:
    """Test-split scores of the parents and the untuned merges (what the selected candidates are compared to)."""
    results: dict[str, Any] = {}
    for ref in session.parents():
        session.activate_parent(ref)
        results[f"parent:{Path(ref).name}"] = {"kind": "parent", "test": score_table(session.evaluate("test").scores, per_example=True)}
    for name, candidate in session.baselines().items():
        # The untuned settings themselves, so every comparison says what it was compared against.
        results[name] = {"kind": "baseline", "recipe": yaml.safe_load(session.candidate_text(candidate)), "test": {}}
        try:
            session.activate_baseline(candidate)
            results[name]["test"] = score_table(session.evaluate("test").scores, per_example=True)
        except CANDIDATE_FAILURES as error:
            results[name]["failure"] = failure_reason(error)
    return results
