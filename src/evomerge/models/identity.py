"""Model identity, in one place: what a model is made of, independent of where and how it is stored.

An original checkpoint is identified by its weights' content hash (`Checkpoint.content_hash`), where it
came from by its hub revision; a model evomerge made carries a `model_id` in its release packet's
`LINEAGE_FILE` (its parents' content hashes plus its recipe). Run evidence, resume checks, release
packets and the lineage DAG all read identity through this module, so they cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.models.checkpoint import Checkpoint

#: The release packet's lineage record, beside the weights of a model evomerge exported.
LINEAGE_FILE = "lineage.json"
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")


def hub_revision(path: str | Path) -> str | None:
    """The commit of a Hugging Face cache snapshot (`.../snapshots/<sha>/`), else None (a plain directory)."""
    match = _SNAPSHOT.search(Path(path).resolve().as_posix())
    return match.group(1) if match else None


def exported_model_id(path: str | Path) -> str | None:
    """The `model_id` of a model that is itself an evomerge release packet (has `lineage.json`)."""
    lineage_file = Path(path) / LINEAGE_FILE
    if not lineage_file.is_file():
        return None
    try:
        return json.loads(lineage_file.read_text()).get("model_id")
    except (json.JSONDecodeError, AttributeError):
        raise ConfigError(f"{lineage_file} is not a JSON object with a model_id") from None


def parent_identity(ref: str, checkpoint: Checkpoint) -> dict[str, Any]:
    """Who a parent is: weights content hash, tokenizer fingerprint, architecture; `model_id` only when
    the parent is itself an evomerge release packet."""
    record = {
        "ref": ref,
        "content_hash": checkpoint.content_hash(),
        "tokenizer_fingerprint": checkpoint.tokenizer_fingerprint(),
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.model_type,
    }
    exported = exported_model_id(checkpoint.path)
    if exported is not None:
        record["model_id"] = exported
    return record


def parent_evidence(ref: str, checkpoint: Checkpoint, role: str) -> dict[str, Any]:
    """`parent_identity` plus where the parent lives and its shape: what run evidence records."""
    return {
        **parent_identity(ref, checkpoint),
        "role": role,
        "path": str(Path(checkpoint.path).resolve()),
        "revision": hub_revision(checkpoint.path),
        "num_layers": checkpoint.num_layers,
        "adapter": str(checkpoint.adapter) if checkpoint.adapter else None,
        "model_id": exported_model_id(checkpoint.path),
    }


def resume_identity(checkpoint: Checkpoint) -> str:
    """What a score depends on: the weights, the tokenizer's vocabulary and the model config."""
    config = hashlib.sha256(json.dumps(checkpoint.config, sort_keys=True).encode()).hexdigest()
    return f"{checkpoint.content_hash()}:{checkpoint.tokenizer_fingerprint()}:{config}"


def merged_model_id(parents: Sequence[dict[str, Any]], recipe_text: str) -> str:
    """A merged model's id: what it was made from (parents by content) and how (the recipe)."""
    digest = hashlib.sha256()
    for parent in parents:
        digest.update(parent["content_hash"].encode())
    digest.update(recipe_text.encode())
    return "evomerge:" + digest.hexdigest()[:24]
