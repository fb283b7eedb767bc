"""Data-flow-space search: the genome codec, a short evolve end to end, export of its champion, config errors.

Export tolerance (float32, the checkpoints' own RMSNorm epsilon 1e-6): scales in [0.5, 2] move the exported
logits by ~6e-4 on these tiny random models (see tests/test_flow_export.py); asserted at 3e-3.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import write_sum_task
from evomerge.cli import run as cli_run
from evomerge.errors import ConfigError
from evomerge.evaluate import Evaluator, load_causal_lm, load_task
from evomerge.flow import PathModel, PathSpec
from evomerge.lineage.packet import export_candidate
from evomerge.pipelines import evolve
from evomerge.search import load_run
from evomerge.search.config import DfsConfig
from evomerge.search.dfs import DfsGenome, PathCandidate

LAYERS = (4, 4)  # two tiny Llamas of 4 layers: M = 8, T = 24 slots with r = 3
BUDGET = 6
EXPORT_TOLERANCE = 3e-3


def genome(**dfs) -> DfsGenome:
    return DfsGenome(DfsConfig(sources=["a", "b"], **dfs), LAYERS, ("a", "b"), sigma0=1 / 6)


def test_initial_genome_decodes_to_model_a_at_unit_scale():
    codec = genome()
    assert len(codec) == 24 + 9 * 8
    candidate = codec.decode(codec.initial())
    assert candidate.spec.steps == ((0, 0), (0, 1), (0, 2), (0, 3))
    assert candidate.spec.scales == (1.0, 1.0, 1.0, 1.0)


def test_decode_reads_slots_in_order_and_the_transition_scales():
    codec = genome()
    values = dict.fromkeys(codec.names, -0.5)
    # Slot 5 is source 1 layer 1 (global 5); slot 10 is the second repeat's source 0 layer 2 (global 2).
    values["on.005.s1l1"], values["on.010.s0l2"] = 0.01, 0.9
    values["w.emb.5"], values["w.5.2"], values["w.2.5"] = 1.5, 0.7, 1.9
    spec = codec.decode(values).spec
    assert spec.steps == ((1, 1), (0, 2))
    assert spec.scales == (1.5, 0.7)


def test_factorized_scales_are_products_of_from_and_to_factors():
    codec = genome(scaling="factorized")
    assert len(codec) == 24 + 9 + 8
    values = dict.fromkeys(codec.names, 1.0)
    values.update({name: -1.0 for name in codec.names if name.startswith("on.")})
    values["on.003.s0l3"], values["on.004.s1l0"] = 1.0, 1.0
    values["a.emb"], values["b.3"], values["a.3"], values["b.4"] = 1.2, 0.9, 0.8, 1.3
    spec = codec.decode(values).spec
    assert spec.steps == ((0, 3), (1, 0))
    np.testing.assert_allclose(spec.scales, (1.2 * 0.9, 0.8 * 1.3))
    # Factor bounds are the square roots of the scale bounds, so every product stays inside them.
    assert {(g.low, g.high) for g in codec.genes[24:]} == {(0.5**0.5, 2.0**0.5)}


def test_empty_and_too_long_paths_are_failed_candidates():
    codec = genome(max_path_length=5)
    off = dict.fromkeys(codec.names, 1.0) | {n: -1.0 for n in codec.names if n.startswith("on.")}
    assert "empty" in codec.decode(off).failure
    six_on = off | {n: 1.0 for n in codec.names[:6]}
    assert codec.decode(six_on).failure == "the path has 6 steps, more than max_path_length 5"


def test_indicator_genes_start_one_step_from_the_threshold():
    codec = genome()
    start = codec.initial()
    indicators = [start[name] for name in codec.names if name.startswith("on.")]
    # Model A's 4 first-repeat slots on, the other 20 off, each 2 * sigma0 = 1/3 from 0 (a 1-sigma flip).
    assert indicators == pytest.approx([1 / 3] * 4 + [-1 / 3] * 20)


def test_paths_not_genes_identify_candidates():
    codec = genome()
    start = codec.initial()
    nudged = start | {"on.000.s0l0": 0.3, "on.020.s1l0": -0.2, "w.3.3": 1.7}  # same path: w.3.3 is unused
    assert codec.decode(start).key == codec.decode(nudged).key
    assert codec.decode(start).key != codec.decode(start | {"w.0.1": 1.1}).key
    candidate = codec.decode(start)
    assert PathCandidate.from_json(candidate.to_json()) == candidate


def write_config(directory: Path, dfs: dict, name: str = "paths") -> Path:
    config = {
        "name": name,
        "dfs": dfs,
        "objectives": [{"task": "sum.yaml"}],
        "budget": {"candidates": BUDGET, "population": 4},
        "racing": {"enabled": False},
        "seed": 3,
        "sigma0": 0.3,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def dfs_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs")
    write_sum_task(root, examples=16)
    sources = [str(tiny_llama(31)), str(tiny_llama(32))]
    config = write_config(root, {"sources": sources, "repeats": 2, "max_path_length": 8})
    outcome = evolve(config, root / "run")
    return root, sources, outcome


def test_short_dfs_run_stores_paths_and_selects_a_champion(dfs_run):
    root, sources, outcome = dfs_run
    study = load_run(root / "run")[1].study
    # The parents and baselines are fixed trials marked with `kind` (tests/test_optuna_study.py): not candidates.
    done = [t for t in study.trials if t.state.is_finished() and "kind" not in t.user_attrs]
    assert len(done) == BUDGET == outcome.candidates
    for trial in done:
        candidate = PathCandidate.from_json(trial.user_attrs["path"])
        assert "recipe" not in trial.user_attrs
        if trial.user_attrs["status"] == "failed":
            assert trial.user_attrs["failure"] == f"InvalidPathError: {candidate.failure}"
        else:
            assert candidate.spec.source_names == tuple(sources) and 1 <= len(candidate.spec) <= 8
    # CMA-ES starts at the paper's initial path (model A's first-repeat layers on, the rest off), one step
    # (2 * sigma0 = 1/3) from the on/off threshold: the first generation scatters around +-1/3.
    first_generation = [t.params for t in study.trials[:4]]
    on = np.mean([[p[n] for n in p if n.startswith("on.") and int(n[3:6]) < 4] for p in first_generation])
    off = np.mean([[p[n] for n in p if n.startswith("on.") and int(n[3:6]) >= 4] for p in first_generation])
    assert on > 0.1 and off < -0.1
    champion = study.trials[outcome.selection.champion]
    complete = [t for t in done if t.user_attrs["status"] == "complete"]
    assert champion.user_attrs["fitness"] == max(t.user_attrs["fitness"] for t in complete)
    results = outcome.test_results
    assert {f"parent:{Path(s).name}" for s in sources} | {"stack_all_layers"} <= set(results)
    assert results[f"candidate:{champion.number}"]["test"]["sum"]["n"] == 16


def test_parent_baseline_is_the_source_model_itself(dfs_run):
    root, sources, outcome = dfs_run
    # Source B as a parent is B itself (its own embeddings and head), not a path through A's embeddings.
    model, tokenizer = load_causal_lm(sources[1])
    expected = Evaluator(tokenizer, [load_task(root / "sum.yaml")], "test").evaluate(model).scores["sum"].score
    assert outcome.test_results[f"parent:{Path(sources[1]).name}"]["test"]["sum"]["score"] == pytest.approx(expected)


@torch.no_grad()
def test_exported_champion_loads_with_transformers_and_matches_the_path(dfs_run, tmp_path):
    root, sources, outcome = dfs_run
    out = export_candidate(root / "run", "champion", tmp_path / "champion", license="mit")
    study = load_run(root / "run")[1].study
    spec = PathCandidate.from_json(study.trials[outcome.selection.champion].user_attrs["path"]).spec
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == len(spec)
    path = PathModel([AutoModelForCausalLM.from_pretrained(s).eval() for s in sources], spec).eval()
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    gap = (exported(input_ids=ids).logits - path(input_ids=ids).logits).abs().max().item()
    assert gap < EXPORT_TOLERANCE
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["method"] == "dfs" and lineage["run"]["trial"] == outcome.selection.champion
    assert PathSpec.from_dict(json.loads(lineage["recipe"])) == spec
    assert [p["ref"] for p in lineage["parents"]] == sources
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["test"] == outcome.test_results[f"candidate:{outcome.selection.champion}"]["test"]
    card = (out / "README.md").read_text()
    assert "layer paths" in card and "## Why there is no mergekit configuration" in card
    assert not (out / "mergekit_config.yml").exists() and "passthrough" in (out / "MERGEKIT.md").read_text()
    assert ModelCard.load(out / "README.md").data.license == "mit"


def test_the_lineage_of_a_dfs_run_names_its_sources_and_matches_the_exported_packet(dfs_run, tmp_path):
    from evomerge.lineage import lineage

    root, sources, outcome = dfs_run
    graph = lineage(root / "run")
    champion = graph.nodes[graph.root]
    assert champion.details["method"] == "dfs"
    assert [p["ref"] for p in champion.details["parents"]] == sources
    assert len(champion.parents) == len(sources)  # one checkpoint node per source
    spec = PathCandidate.from_json(load_run(root / "run")[1].study.trials[outcome.selection.champion].user_attrs["path"]).spec
    assert len(champion.details["coefficients"]["path"]) == len(spec)
    # The same model id as its exported packet: the run and the packet describe one model.
    packet = export_candidate(root / "run", "champion", tmp_path / "champion", license="mit")
    assert lineage(packet).root == graph.root


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    with pytest.raises(SystemExit) as info:
        cli_run()
    captured = capsys.readouterr()
    return info.value.code, " ".join(captured.err.split())


def test_export_refuses_a_path_with_a_non_positive_scale(dfs_run, tmp_path, monkeypatch, capsys):
    root, sources, _ = dfs_run
    # The search bounds keep scales positive, so plant such a path as an extra trial in a copy of the run.
    run_dir = Path(shutil.copytree(root / "run", tmp_path / "run"))
    study = load_run(run_dir)[1].study
    spec = PathSpec(LAYERS, ((0, 0), (1, 2)), (-1.0, 1.0), tuple(sources))
    planted = optuna.trial.create_trial(value=0.0, user_attrs={"path": PathCandidate(spec).to_json()})
    study.add_trial(planted)
    number = len(study.trials) - 1
    code, err = invoke(monkeypatch, capsys, "export", str(run_dir), "--candidate", str(number),
                       "--out", str(tmp_path / "neg"))
    assert code == 2
    assert err.startswith("error: path step 0 has scale -1.0; only positive scales can be folded")
    assert not (tmp_path / "neg").exists()


def gpt2_source(tiny_llama, directory: Path) -> Path:
    llama = AutoConfig.from_pretrained(tiny_llama(31))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=llama.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_text((tiny_llama(31) / "tokenizer.json").read_text())
    return directory


@pytest.mark.parametrize("case", ["too long", "hidden size", "architecture", "ps_run not finished"])
def test_config_errors_exit_2_in_one_sentence(case, tiny_llama, tmp_path, monkeypatch, capsys):
    write_sum_task(tmp_path, examples=16)
    a, b = str(tiny_llama(31)), str(tiny_llama(32))
    dfs, expected = {
        "too long": ({"sources": [a, b], "max_path_length": 3},
                     "dfs.max_path_length 3 is shorter than model A's 4 layers"),
        "hidden size": ({"sources": [a, str(tiny_llama(33, hidden_size=48))]},
                        "sources of different hidden size cannot share a path: 32 (source 0) vs 48 (source 1)"),
        "architecture": ({"sources": [str(gpt2_source(tiny_llama, tmp_path / "gpt2")), b]},
                         "source 0 has model_type 'gpt2'; layer paths support only llama"),
        "ps_run not finished": ({"sources": [b], "ps_run": str(tmp_path / "nowhere")},
                                "is not an evomerge run directory"),
    }[case]
    config = write_config(tmp_path, dfs)
    code, err = invoke(monkeypatch, capsys, "evolve", str(config), "--run", str(tmp_path / "run"))
    assert code == 2, err
    assert err.count("error:") == 1 and expected in err.split("error:")[1] and "Traceback" not in err


def test_ps_run_champion_is_exported_once_and_becomes_model_a(lineage_runs, tiny_llama, tmp_path):
    ps_run = tmp_path / "ps_run"
    shutil.copytree(lineage_runs["run_a"], ps_run)
    champion = load_run(ps_run)[1].selection["champion"]
    write_sum_task(tmp_path, examples=8)
    config = write_config(tmp_path, {"sources": [str(tiny_llama(1))], "ps_run": str(ps_run), "repeats": 2,
                                     "max_path_length": 8})
    evolve(config, tmp_path / "run")
    model_a = ps_run / "dfs_model_a"
    assert json.loads((model_a / "lineage.json").read_text())["run"]["trial"] == champion
    evidence = load_run(tmp_path / "run")[1].evidence
    assert [p["path"] for p in evidence["parents"]] == [str(model_a.resolve()), str(tiny_llama(1).resolve())]
    # A stale export (the PS run's champion changed since) is refused rather than reused.
    record = json.loads((model_a / "lineage.json").read_text())
    record["run"]["trial"] = champion + 1
    (model_a / "lineage.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=f"holds candidate {champion + 1} but the champion"):
        evolve(config, tmp_path / "run")


def test_the_report_of_a_dfs_run_shows_its_method_champion_path_and_lineage(dfs_run, tmp_path):
    from evomerge.report.data import load_run_data
    from evomerge.report.html import build_sections, write_report

    root, sources, outcome = dfs_run
    sections = {s.id: s for s in build_sections(load_run_data(root / "run"))}
    assert "coefficients" not in sections  # a path has no merge coefficients
    path = sections["path"].figure
    # Legend entries are the sources' directory names, never their full (temporary) paths.
    assert {t.name for t in path.data if t.mode == "markers"} <= {Path(s).name for s in sources}
    assert path.layout.xaxis.dtick == 1 and path.layout.xaxis.tickformat == "d"  # whole steps only
    lineage = sections["lineage"].figure
    assert lineage is not None, sections["lineage"].note
    labels = {text for trace in lineage.data for text in (trace.hovertext or ())}
    assert f"layer path, trial {outcome.selection.champion} of run paths" in labels
    assert all(any(label.startswith(str(Path(s).resolve())) for label in labels) for s in sources), labels
    text = write_report(root / "run", tmp_path / "r.html").path.read_text()
    assert "layer paths (DFS) through 2 source(s), 2 repeats" in text and "dare_ties" not in text
    assert f"<th>champion</th><td>trial {outcome.selection.champion}</td>" in text
    assert "No champion yet" not in text and "cannot be traced" not in text
