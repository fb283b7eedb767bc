"""Run-level evidence: what a search was made of, recorded in its run store when the run starts.

Per-candidate evidence (recipe, scores, resources, status) already lives on each trial; what a trial
cannot say is which exact parents, tokenizers, task data and software it ran against. That is recorded
here once per run, on the study (`RunStore.evidence`), so the evidence travels with the study's
database — SQLite file or shared server — and needs no schema of its own. Each session
(the first and every resume) is appended to `sessions`; a session whose parents or task data differ
from the run's start records what changed, so the evidence says which trials saw which inputs.
(Whether such a resume is allowed at all is `search.integrity`'s decision, not this module's.)
Parents are identified by `models.identity`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.evaluate import Task
from evomerge.models import Checkpoint, parent_evidence
from evomerge.search.config import EvolveConfig
from evomerge.search.store import RunStore

_LIBRARIES = ("torch", "transformers", "optuna", "safetensors")


def task_evidence(task: Task, weight: float, direction: str) -> dict[str, Any]:
    """One objective: the task file, its content fingerprint (file + data bytes) and split sizes."""
    return {
        "name": task.name,
        "path": str(Path(task.path).resolve()),
        "fingerprint": task.fingerprint(),
        "scorer": task.spec.scorer,
        "n": {split: len(task.examples(split)) for split in ("search", "test")},
        "weight": weight,
        "direction": direction,
    }


def software_versions() -> dict[str, str]:
    """Versions that change numbers: evomerge, Python and the numeric libraries."""
    versions = {"evomerge": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def run_evidence(
    config: EvolveConfig,
    *,
    checkpoints: Mapping[str, Checkpoint],
    base: str | None,
    compat_verdict: str,
    compat_notes: Sequence[str] = (),
    tasks: Sequence[Any],
) -> dict[str, Any]:
    """The run's inputs as a JSON-ready record (parents in recipe order: base first, then the others).

    `checkpoints` maps each parent reference (as the recipes name it) to its opened checkpoint — pass
    the session's own objects so their cached content hashes are reused; `tasks` are in objective order
    (task files, or `search.external` objectives, which describe themselves).
    """
    order = ([base] if base else []) + [ref for ref in checkpoints if ref != base]
    parents = [parent_evidence(ref, checkpoints[ref], "base" if ref == base else "merged") for ref in order]
    objectives = config.objectives
    return {
        "name": config.name,
        "method": config.method,
        "parents": parents,
        "compatibility": {"verdict": compat_verdict, "notes": list(compat_notes)},
        "suite": [
            task_evidence(t, o.weight, o.direction) if isinstance(t, Task) else t.evidence(o.weight, o.direction)
            for t, o in zip(tasks, objectives, strict=True)
        ],
        "combine": config.combine,
        "intended_use": config.intended_use,
        "seed": config.seed,
        "software": software_versions(),
        "sessions": [],
    }


def _identity(evidence: Mapping[str, Any]) -> dict[str, Any]:
    # What must not change across a resume: the weights and the task data the trials were scored on.
    return {
        "parents": {p["ref"]: p["content_hash"] for p in evidence["parents"]},
        "suite": {t["name"]: t["fingerprint"] for t in evidence["suite"]},
    }


def record_run_evidence(store: RunStore, fresh: dict[str, Any], *, device: str) -> dict[str, Any]:
    """Store the run's evidence (`run_evidence`, from the session) and append this session to it.

    On a resume the run-start record is kept and the session notes every parent or task that changed.
    """
    stored = store.evidence
    session = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "software": fresh["software"],
        "trials_before": len(store.trials()),
    }
    if stored is not None:
        session["changed"] = changed_inputs(_identity(stored), _identity(fresh))
        fresh = stored
    fresh = {**fresh, "sessions": [*fresh["sessions"], session]}
    store.set_evidence(fresh)
    return fresh


def changed_inputs(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """Parents and tasks whose content hash differs between two identities: {kind: {name: new hash}}."""
    return {
        kind: {name: now[kind].get(name) for name, value in before[kind].items() if now[kind].get(name) != value}
        for kind in ("parents", "suite")
    }
