"""Run-level evidence: what a search was made of, recorded on its Optuna study when the run starts.

Per-candidate evidence (recipe, scores, resources, status) already lives on each trial; what a trial
cannot say is which exact parents, tokenizers, task data and software it ran against. That is recorded
here once per run, in the study's user attributes (`evidence`), so the evidence travels with the
study's database — SQLite file or shared server — and needs no schema of its own. Each session
(the first and every resume) is appended to `sessions`; a session whose parents or task data differ
from the run's start records what changed, so the evidence says which trials saw which inputs.
(Whether such a resume is allowed at all is `search.integrity`'s decision, not this module's.)
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.evaluate import Task
from evomerge.lineage.packet import LINEAGE_FILE
from evomerge.models import Checkpoint
from evomerge.search.config import EvolveConfig

EVIDENCE_ATTR = "evidence"
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")
_LIBRARIES = ("torch", "transformers", "optuna", "safetensors")


def hub_revision(path: str | Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (`.../snapshots/<sha>/`), else None (a plain directory)."""
    match = _SNAPSHOT.search(Path(path).resolve().as_posix())
    return match.group(1) if match else None


def exported_model_id(path: str | Path) -> str | None:
    """The `model_id` of a parent that is itself an evomerge release packet (has `lineage.json`)."""
    lineage_file = Path(path) / LINEAGE_FILE
    if not lineage_file.is_file():
        return None
    try:
        return json.loads(lineage_file.read_text()).get("model_id")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{lineage_file} is not a JSON object with a model_id") from None


def parent_evidence(ref: str, checkpoint: Checkpoint, role: str) -> dict[str, Any]:
    """Identity of one parent: content hash (weights), tokenizer fingerprint, architecture, where it lives."""
    return {
        "ref": ref,
        "role": role,
        "path": str(Path(checkpoint.path).resolve()),
        "revision": hub_revision(checkpoint.path),
        "content_hash": checkpoint.content_hash(),
        "tokenizer_fingerprint": checkpoint.tokenizer_fingerprint(),
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.model_type,
        "num_layers": checkpoint.num_layers,
        "adapter": str(checkpoint.adapter) if checkpoint.adapter else None,
        "model_id": exported_model_id(checkpoint.path),
    }


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
    tasks: Sequence[Task],
) -> dict[str, Any]:
    """The run's inputs as a JSON-ready record (parents in recipe order: base first, then the others)."""
    order = ([base] if base else []) + [ref for ref in checkpoints if ref != base]
    parents = [parent_evidence(ref, checkpoints[ref], "base" if ref == base else "merged") for ref in order]
    objectives = config.objectives
    return {
        "name": config.name,
        "method": config.method,
        "parents": parents,
        "compatibility": {"verdict": compat_verdict, "notes": list(compat_notes)},
        "suite": [task_evidence(t, o.weight, o.direction) for t, o in zip(tasks, objectives, strict=True)],
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


def record_run_evidence(
    study: optuna.Study,
    config: EvolveConfig,
    *,
    checkpoints: Mapping[str, Checkpoint],
    base: str | None,
    compat_verdict: str,
    compat_notes: Sequence[str] = (),
    tasks: Sequence[Task],
    device: str,
) -> dict[str, Any]:
    """Store the run's evidence on `study` and append this session to it; return the evidence.

    `checkpoints` maps each parent reference (as the recipes name it) to its opened checkpoint — pass
    the session's own objects so their cached content hashes are reused; `tasks` are in objective order.
    On a resume the run-start record is kept and the session notes every parent or task that changed.
    """
    fresh = run_evidence(config, checkpoints=checkpoints, base=base, compat_verdict=compat_verdict,
                         compat_notes=compat_notes, tasks=tasks)
    stored = study.user_attrs.get(EVIDENCE_ATTR)
    session = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "software": fresh["software"],
        "trials_before": len(study.get_trials(deepcopy=False)),
    }
    if stored is not None:
        session["changed"] = changed_inputs(_identity(stored), _identity(fresh))
        fresh = stored
    fresh = {**fresh, "sessions": [*fresh["sessions"], session]}
    study.set_user_attr(EVIDENCE_ATTR, fresh)
    return fresh


def changed_inputs(before: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """Parents and tasks whose content hash differs between two identities: {kind: {name: new hash}}."""
    return {
        kind: {name: now[kind].get(name) for name, value in before[kind].items() if now[kind].get(name) != value}
        for kind in ("parents", "suite")
    }


def stored_evidence(study: optuna.Study) -> dict[str, Any] | None:
    """The run evidence of a study, or None for runs recorded before evidence existed."""
    return study.user_attrs.get(EVIDENCE_ATTR)
