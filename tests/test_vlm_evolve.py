"""Evolving a VLM's language tower: in-memory merges into a live Llava, the prefix-mapped genome, an
evolve run end to end (baselines, selection, test scores, export of a loadable Llava packet)."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

from conftest import read_tensors
from evomerge.errors import ConfigError
from evomerge.lineage import export_candidate
from evomerge.merge import InMemoryMerger, parse_recipe
from evomerge.pipelines import evolve
from evomerge.search import load_run
from evomerge.search.config import load_evolve_config
from evomerge.search.session import open_session
from test_image_tasks import write_image_task

TOWER = {"prefix": "language_model.", "parent_prefix": ""}


def expected_linear(vlm: dict, llm: dict, weight: float) -> dict:
    """A linear merge of the VLM's language tower with a plain LLM, the rest copied from the VLM."""
    out = {}
    for name, tensor in vlm.items():
        if name.startswith("language_model."):
            out[name] = weight * tensor + (1 - weight) * llm[name.removeprefix("language_model.")]
        else:
            out[name] = tensor
    return out


def test_merge_into_writes_a_live_llava_under_transformers_renamed_parameters(tiny_vlm, tiny_llama):
    llm = tiny_llama(3)
    recipe = parse_recipe({
        "method": "linear",
        "models": [{"model": str(tiny_vlm), "parameters": {"weight": 0.7}},
                   {"model": str(llm), "parameters": {"weight": 0.3}}],
        "submodule": {**TOWER, "copy_rest_from": str(tiny_vlm)},
    })
    live = LlavaForConditionalGeneration.from_pretrained(tiny_vlm)
    InMemoryMerger(recipe).merge_into(live, recipe)
    expected = expected_linear(read_tensors(tiny_vlm), read_tensors(llm), 0.7)
    live_state = live.state_dict()
    assert len(live_state) == len(expected)
    for name, tensor in expected.items():
        # transformers 5's live names: the checkpoint's language_model.model.* / language_model.lm_head /
        # vision_tower.* / multi_modal_projector.* are model.language_model.* / lm_head / model.*.
        if name.startswith("language_model.model."):
            live_name = "model.language_model." + name.removeprefix("language_model.model.")
        elif name.startswith("language_model.lm_head"):
            live_name = name.removeprefix("language_model.")
        else:
            live_name = "model." + name
        torch.testing.assert_close(live_state[live_name], tensor, msg=name)


@pytest.fixture(scope="module")
def vlm_run(tiny_vlm, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_evolve")
    write_image_task(
        root, [{"seed": 100 + i} if i % 2 else {"image": None, "question": f"{i}+1"} for i in range(8)],
        [{"seed": 200 + i} for i in range(4)],
    )
    config = {
        "name": "vlm",
        "base_model": str(tiny_llama(0)),
        "parents": [str(tiny_vlm), str(tiny_llama(1))],
        "submodule": {**TOWER, "copy_rest_from": str(tiny_vlm)},
        "method": "dare_ties",
        "genome": {"weight": {"bounds": [0.0, 1.0], "granularity": "per_layer"}, "density": {"bounds": [0.2, 1.0]}},
        "objectives": [{"task": "vqa.yaml"}],
        "budget": {"candidates": 4, "population": 4},
        "seed": 3,
        "intended_use": "tests",
        "license": "apache-2.0",
    }
    (root / "evolve.yaml").write_text(yaml.safe_dump(config))
    return root, evolve(root / "evolve.yaml", root / "run")


def test_the_genome_holds_only_language_tower_tensors(vlm_run):
    root, _ = vlm_run
    session = open_session(*load_evolve_config(root / "evolve.yaml"))
    # per_layer weights for both parents over 4 language layers + the outside group; a density per parent.
    assert len(session.genome) == 2 * 5 + 2
    recipe = session.decode(session.genome.initial())
    filters = [rule.filter for rule in recipe.models[0].parameters["weight"]]
    assert filters and all(f.startswith("language_model.") for f in filters)
    assert not any("vision_tower" in name for group in session.genome.groups.values()
                   for names in group.members.values() for name in names)


def test_a_vlm_run_scores_parents_baselines_and_champion_on_test(vlm_run, tiny_vlm, tiny_llama):
    _, outcome = vlm_run
    kinds = {name: result["kind"] for name, result in outcome.test_results.items()}
    assert sorted(k for k in kinds.values() if k == "parent") == ["parent"] * 3
    assert sum(k == "baseline" for k in kinds.values()) == 5
    for result in outcome.test_results.values():
        assert result["test"]["vqa"]["n"] == 4


def test_a_parent_llm_is_scored_as_the_vlm_with_its_language_tower(vlm_run, tiny_vlm, tiny_llama):
    root, _ = vlm_run
    session = open_session(*load_evolve_config(root / "evolve.yaml"))
    session.activate_parent(str(tiny_llama(1)))
    live = session.model.state_dict()
    llm, vlm = read_tensors(tiny_llama(1)), read_tensors(tiny_vlm)
    torch.testing.assert_close(live["lm_head.weight"], llm["lm_head.weight"])
    torch.testing.assert_close(live["model.language_model.norm.weight"], llm["model.norm.weight"])
    torch.testing.assert_close(live["model.multi_modal_projector.linear_1.weight"], vlm["multi_modal_projector.linear_1.weight"])


def test_the_exported_champion_is_a_llava_that_answers_an_image_question(vlm_run, tiny_vlm, tmp_path):
    root, _ = vlm_run
    out = export_candidate(root / "run", "champion", tmp_path / "champion")
    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    merged, vlm = read_tensors(out), read_tensors(tiny_vlm)
    for name, tensor in vlm.items():
        if not name.startswith("language_model."):
            assert torch.equal(merged[name], tensor), name  # vision tower and projector: the VLM's
    assert any(not torch.equal(merged[n], vlm[n]) for n in vlm if n.startswith("language_model.model.layers."))
    from test_image_tasks import picture

    inputs = processor(images=[picture(1)], text=[processor.image_token + "q1="], return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out_ids.shape[1] > inputs["input_ids"].shape[1]
    assert (out / "README.md").is_file() and (out / "recipe.yaml").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["submodule"]["prefix"] == "language_model."


def test_lineage_of_the_exported_vlm_leads_to_the_vlm_the_llm_and_the_base(vlm_run, tiny_vlm, tiny_llama, tmp_path):
    from evomerge.lineage.dag import checkpoint_id, lineage
    from evomerge.models import Checkpoint

    root, _ = vlm_run
    out = export_candidate(root / "run", "champion", tmp_path / "champion")
    graph = lineage(out)
    leaves = {node.id for node in graph.nodes.values() if node.kind == "checkpoint"}
    expected = {checkpoint_id(Checkpoint.open(path).content_hash()) for path in (tiny_vlm, tiny_llama(0), tiny_llama(1))}
    assert leaves == expected


def test_a_vlm_run_with_two_workers_counts_every_candidate(vlm_run, tmp_path):
    root, _ = vlm_run
    config = yaml.safe_load((root / "evolve.yaml").read_text())
    config["objectives"] = [{"task": str(root / "vqa.yaml")}]
    (tmp_path / "evolve.yaml").write_text(yaml.safe_dump(config))
    outcome = evolve(tmp_path / "evolve.yaml", tmp_path / "run", workers=2)
    assert outcome.candidates == 4 and len(load_run(tmp_path / "run")[1].counted_trials()) == 4


def test_dfs_over_a_vlm_is_refused_in_one_sentence(tmp_path, tiny_vlm, tiny_llama):
    write_image_task(tmp_path, [{"seed": 1}], [{"seed": 2}])
    config = {
        "dfs": {"sources": [str(tiny_vlm), str(tiny_llama(1))]}, "submodule": {**TOWER, "copy_rest_from": str(tiny_vlm)},
        "objectives": [{"task": "vqa.yaml"}],
    }
    (tmp_path / "evolve.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="`dfs` cannot search a sub-module"):
        load_evolve_config(tmp_path / "evolve.yaml")


def test_resume_of_a_vlm_run_keeps_its_trials(vlm_run):
    root, outcome = vlm_run
    store = load_run(root / "run")[1]
    assert len(store.counted_trials()) == outcome.candidates == 4
