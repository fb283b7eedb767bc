"""Run evidence and lineage checked against what actually ran: two real tiny evolves, the second using
the first one's exported champion as a parent (fixture `lineage_runs` in conftest)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError
from evomerge.evaluate import load_task
from evomerge.lineage.dag import checkpoint_id, lineage, render_tree, to_dot
from evomerge.models import Checkpoint, check_compatible
from evomerge.search import RunStore, load_run


def test_evidence_matches_the_parents_and_tasks_on_disk(lineage_runs):
    study = load_run(lineage_runs["run_a"])[1].study
    evidence = RunStore(study).evidence
    paths = [lineage_runs[k] for k in ("base", "one", "two")]
    assert [p["path"] for p in evidence["parents"]] == [str(p.resolve()) for p in paths]
    assert [p["role"] for p in evidence["parents"]] == ["base", "merged", "merged"]
    for record, path in zip(evidence["parents"], paths):
        checkpoint = Checkpoint.open(path)
        assert record["content_hash"] == checkpoint.content_hash()
        assert record["tokenizer_fingerprint"] == checkpoint.tokenizer_fingerprint()
        assert (record["architecture"], record["model_type"]) == ("LlamaForCausalLM", "llama")
        assert record["model_id"] is None and record["revision"] is None
    opened = [Checkpoint.open(p) for p in paths]
    assert evidence["compatibility"]["verdict"] == check_compatible(opened[1:], base=opened[0]).verdict
    task = load_task(lineage_runs["task"])
    (suite,) = evidence["suite"]
    assert suite["fingerprint"] == task.fingerprint() and suite["n"] == {"search": 8, "test": 8}
    assert evidence["intended_use"] == "test model run_a"
    assert evidence["sessions"][0]["trials_before"] == 0
    # A random-sampler run (no generations of its own) counts generations in candidates, population 2;
    # the parents' and baselines' reference trials are no candidates and do not count.
    assert len(RunStore(study).references()) > 0
    assert [record.generation for record in RunStore(study).counted_trials()] == [0, 0, 1, 1]
    # Every scored trial used exactly the recorded suite's search split.
    for trial in study.get_trials():
        if trial.user_attrs.get("status") == "complete":
            assert trial.user_attrs["scores"]["add"]["n"] == suite["n"]["search"]


def test_a_packet_used_as_parent_is_recorded_by_its_model_id(lineage_runs):
    study = load_run(lineage_runs["run_b"])[1].study
    parents = {p["path"]: p for p in RunStore(study).evidence["parents"]}
    packet = json.loads((lineage_runs["packet_a"] / "lineage.json").read_text())
    assert parents[str(lineage_runs["packet_a"].resolve())]["model_id"] == packet["model_id"]


def test_lineage_of_run_b_spans_both_runs_back_to_the_original_checkpoints(lineage_runs):
    graph = lineage(lineage_runs["run_b"])
    assert graph.runs() == [str(lineage_runs["run_b"].resolve()), str(lineage_runs["run_a"].resolve())]
    packet = json.loads((lineage_runs["packet_a"] / "lineage.json").read_text())
    root = graph.nodes[graph.root]
    assert packet["model_id"] in root.parents
    champion_a = graph.nodes[packet["model_id"]]
    assert champion_a.details["run"]["trial"] == packet["run"]["trial"]
    originals = {checkpoint_id(Checkpoint.open(lineage_runs[k]).content_hash()) for k in ("base", "one", "two")}
    leaves = {n.id for n in graph.nodes.values() if n.kind == "checkpoint"}
    assert leaves == originals
    # The base is shared by both merges but is one node with two children.
    base_id = checkpoint_id(Checkpoint.open(lineage_runs["base"]).content_hash())
    assert sum(parent == base_id for parent, _ in graph.edges()) == 2


def test_champion_node_shows_every_field_the_run_recorded(lineage_runs):
    study = load_run(lineage_runs["run_b"])[1].study
    number = study.user_attrs["selection"]["champion"]
    trial = study.get_trials()[number]
    details = lineage(lineage_runs["run_b"]).nodes[lineage(lineage_runs["run_b"]).root].details
    assert details["run"]["trial"] == number and details["run"]["generation"] == trial.user_attrs["generation"]
    assert details["status"] == trial.user_attrs["status"] and "champion" in details["roles"]
    assert details["recipe"] == trial.user_attrs["recipe"]
    recipe = yaml.safe_load(trial.user_attrs["recipe"])
    assert details["coefficients"]["models"] == {m["model"]: m["parameters"] for m in recipe["models"]}
    assert details["scores"]["search"] == trial.user_attrs["scores"]
    assert details["scores"]["test"] == study.user_attrs["test_results"][f"candidate:{number}"]["test"]
    for key in ("merge_seconds", "eval_seconds", "tokens", "peak_memory_bytes", "device"):
        assert details["resources"][key] == trial.user_attrs[key]
    assert details["suite"][0]["fingerprint"] == load_task(lineage_runs["task"]).fingerprint()
    assert details["compatibility"]["verdict"].startswith("compatible")
    assert details["intended_use"] == "test model run_b"
    assert {p["content_hash"] for p in details["parents"]} == {
        Checkpoint.open(lineage_runs[k]).content_hash() for k in ("base", "two")
    } | {Checkpoint.open(lineage_runs["packet_a"]).content_hash()}


def test_exported_champion_and_run_champion_have_the_same_identity(lineage_runs):
    from_packet = lineage(lineage_runs["packet_a"])
    from_run = lineage(lineage_runs["run_a"])
    assert from_packet.root == from_run.root
    assert from_packet.nodes[from_packet.root].details["packet"] == str(lineage_runs["packet_a"].resolve())


def test_renderings_carry_ids_hashes_and_scores(lineage_runs):
    graph = lineage(lineage_runs["run_b"])
    dot = to_dot(graph)
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == len(graph.edges())
    for node_id in graph.nodes:
        assert f'"{node_id}"' in dot
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(render_tree(graph))
    text = console.export_text()
    for node in graph.nodes.values():
        assert node.id.split(":")[-1][:12] in text
    assert "compatibility: compatible" in text and "evaluation suite" in text and "peak memory" in text


def test_cli_formats(lineage_runs):
    runner = CliRunner()
    result = runner.invoke(app, ["lineage", str(lineage_runs["run_b"]), "--format", "json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["root"] == lineage(lineage_runs["run_b"]).root and len(data["edges"]) == 6
    dot = runner.invoke(app, ["lineage", str(lineage_runs["packet_a"]), "--format", "dot"])
    assert dot.exit_code == 0 and re.search(r"-> \"evomerge:[0-9a-f]{24}\"", dot.stdout)
    missing = runner.invoke(app, ["lineage", str(lineage_runs["root"] / "nothing")])
    # `app` raises user errors; the `evomerge` entry point turns them into exit code 2.
    assert isinstance(missing.exception, ConfigError) and "neither an exported model" in str(missing.exception)


def _orphan_packet(lineage_runs, tmp_path, edit) -> tuple:
    """A copy of run A's packet whose run is gone (so its own lineage.json is the evidence), edited."""
    import shutil

    packet = tmp_path / "packet"
    shutil.copytree(lineage_runs["packet_a"], packet)
    record = json.loads((packet / "lineage.json").read_text())
    record["run"] = {"dir": str(tmp_path / "gone"), "trial": 0}
    edit(record, packet)
    (packet / "lineage.json").write_text(json.dumps(record))
    return packet, record


def test_a_lineage_file_naming_itself_as_a_parent_is_refused(lineage_runs, tmp_path):
    def point_at_itself(record, packet):
        record["parents"][0] = {"path": str(packet), "ref": str(packet), "content_hash": "0" * 64}

    packet, record = _orphan_packet(lineage_runs, tmp_path, point_at_itself)
    with pytest.raises(ConfigError, match=rf"lineage.json names itself among its own ancestors \(model {record['model_id']}\)"):
        lineage(packet)


def test_a_lineage_parent_without_a_hash_is_refused(lineage_runs, tmp_path):
    def drop_hash(record, packet):
        del record["parents"][1]["content_hash"]

    packet, _ = _orphan_packet(lineage_runs, tmp_path, drop_hash)
    with pytest.raises(ConfigError, match=r"lineage.json: parents\[1\] has no content_hash"):
        lineage(packet)


def test_a_run_whose_config_allows_pickled_parents_exports_and_traces_them(lineage_runs, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from evomerge.lineage.packet import export_candidate
    from evomerge.pipelines import evolve

    pickled = tmp_path / "pickled"
    shutil.copytree(lineage_runs["two"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    config = yaml.safe_load((lineage_runs["run_a"] / "config.yaml").read_text())
    config.update(name="pickled", parents=[str(lineage_runs["one"]), str(pickled)], allow_pickle=True)
    (tmp_path / "pickled.yaml").write_text(yaml.safe_dump(config))
    evolve(tmp_path / "pickled.yaml", tmp_path / "run")
    packet = export_candidate(tmp_path / "run", "champion", tmp_path / "champion")
    record = json.loads((packet / "lineage.json").read_text())
    expected = Checkpoint.open(pickled, allow_pickle=True).content_hash()
    by_ref = {parent["ref"]: parent for parent in record["parents"]}
    assert by_ref[str(pickled)]["content_hash"] == expected  # the pickled parent, identified by its weights
    assert lineage(tmp_path / "run").root == lineage(packet).root
