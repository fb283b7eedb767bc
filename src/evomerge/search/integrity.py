"""Resume integrity: a run's parents must be the models its history was measured on.

The first run records, per parent, a cheap file fingerprint and the model's identity (weights content
hash, tokenizer fingerprint, config). On resume the fingerprint is compared first; only when it differs
(files rewritten, touched, copied) is the identity recomputed, so an unchanged multi-gigabyte parent costs
a few `stat` calls. A parent whose identity changed is refused: scores measured on the old weights would
be silently mixed with scores on the new ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import ConfigError
from evomerge.models import Checkpoint, resume_identity
from evomerge.search.config import EvolveConfig, resolve_path
from evomerge.search.store import PARENTS_FILE


class ChangedParentsError(ConfigError):
    """A parent directory holds different weights, tokenizer or config than when the run started."""


def parent_refs(config: EvolveConfig, root: Path) -> list[str]:
    """Every model the search reads: base, parents and data-flow sources, resolved, without repeats."""
    refs = ([config.base_model] if config.base_model else []) + config.merged_parents
    if config.dfs is not None:
        refs += list(config.dfs.sources)
    return list(dict.fromkeys(resolve_path(ref, root) for ref in refs))


def verify_parents_unchanged(run_dir: Path, refs: Sequence[str], *, allow_pickle: bool = False, accept_changed: bool = False) -> list[str]:
    """Record the parents on the first run; on resume refuse changed ones unless `accept_changed`.

    Returns the refs whose identity changed (accepted ones are re-recorded, so the next resume compares
    against the new models).
    """
    path = run_dir / PARENTS_FILE
    stored = _read_parents(path) if path.is_file() else {}
    changed: list[str] = []
    current: dict[str, dict[str, str]] = {}
    for ref in refs:
        old = stored.get(ref)
        checkpoint = Checkpoint.open(ref, allow_pickle=allow_pickle)
        fingerprint = checkpoint.file_fingerprint()
        if old is not None and old["fingerprint"] == fingerprint:
            current[ref] = old
            continue
        current[ref] = {"fingerprint": fingerprint, "identity": resume_identity(checkpoint)}
        if old is not None and old["identity"] != current[ref]["identity"]:
            changed.append(ref)
    if changed and not accept_changed:
        raise ChangedParentsError(
            f"parent {changed[0]} changed since run {run_dir} started (different weights, tokenizer or config); "
            "its history was measured on the old model — pass --accept-changed-parents to continue anyway"
        )
    if current != stored:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(path)
    return changed


def _read_parents(path: Path) -> dict[str, dict[str, str]]:
    """The recorded parents: {ref: {"fingerprint": str, "identity": ...}}; anything else is a damaged run."""
    damaged = ConfigError(f"{path} is damaged (not the parents this run recorded); restore it or start a new --run")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise damaged from None
    if not isinstance(stored, dict) or not all(
        isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str) and "identity" in entry
        for entry in stored.values()
    ):
        raise damaged
    return stored
