"""Model identity (models/identity.py): hub revisions, exported model ids, parent records, merged ids."""

from __future__ import annotations

import json

import pytest

from evomerge.errors import ConfigError
from evomerge.models import (
    LINEAGE_FILE,
    Checkpoint,
    exported_model_id,
    hub_revision,
    merged_model_id,
    parent_evidence,
    parent_identity,
)
from evomerge.search.evidence import changed_inputs


def test_hub_revision_reads_snapshot_commits(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--name" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    assert hub_revision(snapshot) == sha
    assert hub_revision(tmp_path) is None


def test_exported_model_id_and_its_malformed_file(tmp_path):
    assert exported_model_id(tmp_path) is None
    (tmp_path / LINEAGE_FILE).write_text(json.dumps({"model_id": "evomerge:abc"}))
    assert exported_model_id(tmp_path) == "evomerge:abc"
    (tmp_path / LINEAGE_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="is not a JSON object with a model_id"):
        exported_model_id(tmp_path)


def test_parent_records_share_one_identity(tiny_llama):
    path = tiny_llama(0)
    checkpoint = Checkpoint.open(path)
    identity = parent_identity(str(path), checkpoint)
    assert identity["content_hash"] == checkpoint.content_hash() and "model_id" not in identity
    evidence = parent_evidence(str(path), checkpoint, "base")
    assert {k: evidence[k] for k in identity} == identity and evidence["model_id"] is None
    assert merged_model_id([identity], "recipe") == merged_model_id([evidence], "recipe")
    assert merged_model_id([identity], "recipe") != merged_model_id([identity], "other recipe")


def test_changed_inputs_names_only_what_changed():
    before = {"parents": {"a": "1", "b": "2"}, "suite": {"t": "x"}}
    now = {"parents": {"a": "1", "b": "3"}, "suite": {"t": "x"}}
    assert changed_inputs(before, now) == {"parents": {"b": "3"}, "suite": {}}
