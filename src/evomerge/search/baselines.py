"""Baselines: the parents alone and untuned merges, scored once per run, and the warm start they give."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.evaluate import EvalReport
from evomerge.search.genome import ParameterGenome
from evomerge.search.objectives import Objectives, score_table
from evomerge.search.pool import SELECT, START_SELECTED, START_UNSELECTED, covering_choice
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
        # Per-example values where an estimated fitness chooses its anchors from them and fits its IRT on
        # them, and where a pool's start is the set of parents that covers the most answers.
        "search": score_table(
            report.scores, per_example=session.config.fitness.estimator != "full" or bool(session.config.parents_pool)
        ),
        "fitness": session.objectives.fitness(scores),
    }


def record_reference_trials(store: RunStore, baselines: Mapping[str, Any], objectives: Objectives) -> None:
    """The parents and untuned baselines as fixed trials beside the candidates (`RunStore.add_reference`),
    once per run; call only when no sampler will ask again (the budget is spent), as samplers would learn
    from them."""
    if store.references():
        return
    for name, record in baselines.items():
        scores = {task: row["score"] for task, row in record["search"].items()}
        values = objectives.values(scores) if record["fitness"] is not None else None
        store.add_reference(name, record["kind"], values, scores=record["search"], fitness=record["fitness"],
                            recipe=record.get("recipe"), failure=record.get("failure"))


def warm_start(session: Session, baselines: Mapping[str, Any]) -> dict[str, float] | None:
    """`start: best_baseline`: the best baseline the genome can express, else the genome's initial values."""
    expressible = {name: b for name, b in baselines.items() if "genome" in b and b["fitness"] is not None}
    if not expressible:
        return session.genome.initial()
    best = max(expressible.values(), key=lambda b: b["fitness"])
    return best["genome"]


def pool_start(
    genome: ParameterGenome, baselines: Mapping[str, Any], signed_weights: Sequence[tuple[str, float]]
) -> dict[str, float]:
    """A pool's selection genes to start from: the parents whose search-split answers together cover the
    most (`pool.covering_choice`) start selected, the others not; empty (keep the configured start) when
    the baselines hold no per-example answers (a run recorded before they were kept)."""
    answers: list[dict[str, Any] | None] = []
    for model in genome.merged_models:
        record = baselines.get(f"parent:{Path(model).name}", {})
        rows = record.get("search") or {}
        usable = record.get("fitness") is not None and rows and all("values" in row for row in rows.values())
        answers.append({task: row["values"] for task, row in rows.items()} if usable else None)
    assert genome.max_parents is not None
    chosen = {genome.merged_models[i] for i in covering_choice(answers, signed_weights, genome.max_parents)}
    if not chosen:
        return {}
    return {
        gene.name: START_SELECTED if gene.model in chosen else START_UNSELECTED
        for gene in genome.genes if gene.param == SELECT
    }


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
