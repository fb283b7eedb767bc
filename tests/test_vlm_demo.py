"""`evomerge demo --vlm` end to end on the cached VLM zoo (a short budget; the acceptance is measured in
docs/ZOO.md): summary.json in the text demo's format, a loadable Llava champion packet, the report."""

from __future__ import annotations

import json

import pytest
import yaml
from transformers import AutoProcessor, LlavaForConditionalGeneration

from evomerge.pipelines.demo_vlm import run_vlm_demo
from evomerge.search.store import load_run

CANDIDATES = 24


@pytest.fixture(scope="module")
def vlm_demo(vlm_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm_demo")
    outcome, summary = run_vlm_demo(out, candidates=CANDIDATES, seed=vlm_zoo.manifest["seed"], zoo_dir=vlm_zoo.root)
    return out, outcome, summary


def test_summary_has_every_parent_baseline_and_the_champion_with_paired_comparisons(vlm_demo):
    out, _, summary = vlm_demo
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["target_task"] == "target" and summary["candidates"] == CANDIDATES
    target = summary["target_task"]
    parents = sorted(name for name in summary["test"] if name.startswith("parent:"))
    assert parents == ["parent:base", "parent:language", "parent:vlm"]
    assert set(summary["baselines"]) <= set(summary["test"]) and len(summary["baselines"]) == 5
    rivals = [name for name in summary["test"] if not name.startswith("candidate:")]
    assert sorted(summary["comparisons"]) == sorted(rivals)
    for name, paired in summary["comparisons"].items():
        champion = summary["test"][summary["champion"]][target]["score"]
        assert paired["difference"] == pytest.approx(champion - summary["test"][name][target]["score"])
        assert paired["n"] == summary["test"][name][target]["n"] == 500
    assert {"best_parent", "best_baseline"} == set(summary["comparison"])
    assert (out / "report.html").is_file()


def test_the_champion_packet_is_a_llava_with_its_processor(vlm_demo, vlm_zoo):
    out, _, _ = vlm_demo
    model = LlavaForConditionalGeneration.from_pretrained(out / "champion")
    processor = AutoProcessor.from_pretrained(out / "champion")
    from PIL import Image

    image = Image.open(next((vlm_zoo.root / "tasks" / "images").glob("vqa_test_*.png")))
    inputs = processor(images=[image], text=[processor.image_token + "n="], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() != ""
    card = (out / "champion" / "README.md").read_text()
    assert "base_model" in card


def test_the_genome_weighs_each_block_kind_of_the_language_tower_only(vlm_demo):
    """A weight per parent, layer and block kind (docs/ZOO.md: per whole layer, seed 2's champion could not
    keep counting and translating together), and the champion's recipe touches language-tower tensors only."""
    out, _, _ = vlm_demo
    _, store = load_run(out / "run")
    kinds = ("attention", "mlp", "norm")
    layers = [f"layer{i}.{kind}" for i in range(4) for kind in kinds] + [f"outside.{k}" for k in ("embedding", "head", "norm")]
    expected = {f"weight.{parent}.{group}" for parent in ("vlm", "language") for group in layers}
    expected |= {"density.vlm.all", "density.language.all"}
    assert {gene["name"] for gene in store.genes} == expected
    recipe = yaml.safe_load((out / "champion" / "recipe.yaml").read_text())
    filters = [rule["filter"] for model in recipe["models"] for rule in model["parameters"]["weight"]]
    assert filters and all(f.startswith("language_model.") for f in filters)
