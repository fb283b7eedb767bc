"""Streaming merges on real tiny checkpoints, each checked against an expectation computed with plain torch.

The expected tensors are formed here from the parents' own tensors (weighted sums of task vectors,
layer re-indexing), never by calling the operator kernels, so a planner that hands the kernels the
wrong tensors, the wrong parameters or the wrong gradient position fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import read_tensors
from evomerge.errors import ConfigError, ExportError
from evomerge.merge.params import layer_position
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.stream import run_merge
from evomerge.models import tensor_role

NUM_LAYERS = 4  # the tiny_llama default


def merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    """Run a streaming merge of `recipe` into `out`; the merged tensors."""
    run_merge(parse_recipe(recipe), out)
    return read_tensors(out)


def position(name: str) -> float:
    """mergekit's gradient position of a tensor of the 4-layer models (0 outside the layers)."""
    return layer_position(tensor_role(name).layer, NUM_LAYERS)


def assert_all_close(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def weights(tiny_family) -> dict[str, dict[str, torch.Tensor]]:
    return {key: read_tensors(path) for key, path in tiny_family.items()}


def test_linear_scalar_weights(tiny_family, weights, tmp_path: Path) -> None:
    recipe = {
        "method": "linear",
        "models": [
            {"model": str(tiny_family["base"]), "parameters": {"weight": 1.0}},
            {"model": str(tiny_family["ft1"]), "parameters": {"weight": 2.0}},
            {"model": str(tiny_family["ft2"]), "parameters": {"weight": 1.0}},
        ],
    }
    b, a, c = weights["base"], weights["ft1"], weights["ft2"]
    expected = {name: (b[name] + 2 * a[name] + c[name]) / 4 for name in b}  # normalize defaults to true
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_gradient_is_interpolated_over_layers(tiny_family, weights, tmp_path: Path) -> None:
    recipe = {
        "method": "task_arithmetic",
        "base_model": str(tiny_family["base"]),
        "models": [
            {"model": str(tiny_family["ft1"]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(tiny_family["ft2"]), "parameters": {"weight": 0.5}},
        ],
    }
    b, a, c = weights["base"], weights["ft1"], weights["ft2"]
    expected = {}
    for name in b:
        t = position(name)  # layer i of 4 -> i/3; embeddings, final norm and lm_head -> 0
        expected[name] = b[name] + t * (a[name] - b[name]) + 0.5 * (c[name] - b[name])
    merged = merge(recipe, tmp_path / "out")
    assert_all_close(merged, expected)
    # The layers really did get different weights: layer 0 carries none of ft1, layer 3 all of it.
    q0, q3 = "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q0], b[q0] + 0.5 * (c[q0] - b[q0]))
    torch.testing.assert_close(merged[q3], a[q3] + 0.5 * (c[q3] - b[q3]))


def test_filter_rules_first_match_wins_and_may_hold_gradients(tiny_family, weights, tmp_path: Path) -> None:
    rules = [
        {"filter": "self_attn", "value": 1.0},
        {"filter": "mlp", "value": [0.0, 1.0]},
        {"filter": "layers", "value": 0.7},  # would also match attention/MLP tensors; earlier rules win
        {"value": 0.25},
    ]
    recipe = {
        "method": "task_arithmetic",
        "base_model": str(tiny_family["base"]),
        "models": [{"model": str(tiny_family["ft1"]), "parameters": {"weight": rules}}],
    }
    b, a = weights["base"], weights["ft1"]

    def weight_of(name: str) -> float:
        if "self_attn" in name:
            return 1.0
        if "mlp" in name:
            return position(name)
        return 0.7 if "layers" in name else 0.25

    expected = {name: b[name] + weight_of(name) * (a[name] - b[name]) for name in b}
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_precedence_per_model_over_global_over_default(tiny_family, weights, tmp_path: Path) -> None:
    recipe = {
        "method": "task_arithmetic",
        "base_model": str(tiny_family["base"]),
        "models": [
            # A filter list that does not match falls through to the global value, as in mergekit.
            {"model": str(tiny_family["ft1"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.7}]}},
            {"model": str(tiny_family["ft2"])},
        ],
        "parameters": {"weight": 0.1},  # `lambda` (1.0) and `normalize` (false) keep their defaults
    }
    b, a, c = weights["base"], weights["ft1"], weights["ft2"]
    expected = {
        name: b[name] + (0.7 if "mlp" in name else 0.1) * (a[name] - b[name]) + 0.1 * (c[name] - b[name])
        for name in b
    }
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_precedence_source_in_slice_over_slice_over_global(tiny_family, weights, tmp_path: Path) -> None:
    base, ft1, ft2 = (str(tiny_family[k]) for k in ("base", "ft1", "ft2"))
    recipe = {
        "method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, NUM_LAYERS]},
                    {
                        "model": ft1,
                        "layer_range": [0, NUM_LAYERS],
                        "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}]},
                    },
                    {"model": ft2, "layer_range": [0, NUM_LAYERS]},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 0.6}]},
            }
        ],
        "parameters": {"weight": 0.2, "lambda": 1.5},
    }
    b, a, c = weights["base"], weights["ft1"], weights["ft2"]

    def weight(name: str, source_rule: bool) -> float:
        if source_rule and "self_attn" in name:
            return 0.9
        return 0.6 if "mlp" in name else 0.2

    expected = {
        name: b[name]
        + 1.5 * (weight(name, True) * (a[name] - b[name]) + weight(name, False) * (c[name] - b[name]))
        for name in b
    }
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_passthrough_slices_stack_layers(tiny_family, weights, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ft1, ft2 = str(tiny_family["ft1"]), str(tiny_family["ft2"])
    recipe = {
        "method": "passthrough",
        "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 3]}]},
            {"sources": [{"model": ft2, "layer_range": [1, 4]}]},
        ],
    }
    out = tmp_path / "stacked"
    merged = merge(recipe, out)
    a, c = weights["ft1"], weights["ft2"]
    # Output layer k: ft1's layer k for k < 3, then ft2's layers 1, 2, 3.
    sources = [(a, 0), (a, 1), (a, 2), (c, 1), (c, 2), (c, 3)]
    expected = {}
    for name in a:
        layer = tensor_role(name).layer
        if layer is None:
            # Embeddings come from the first slice, the final norm and lm_head from the last.
            expected[name] = (a if "embed_tokens" in name else c)[name]
        elif layer == 0:
            for out_layer, (parent, src_layer) in enumerate(sources):
                src_name = name.replace("layers.0.", f"layers.{src_layer}.")
                expected[name.replace("layers.0.", f"layers.{out_layer}.")] = parent[src_name]
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("12+3=", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4


def test_gradient_position_restarts_in_each_slice(tiny_family, weights, tmp_path: Path) -> None:
    base, ft1 = str(tiny_family["base"]), str(tiny_family["ft1"])
    recipe = {
        "method": "task_arithmetic",
        "base_model": base,
        "slices": [
            {
                "sources": [
                    {"model": base, "layer_range": [0, 2]},
                    {"model": ft1, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
            {
                "sources": [
                    {"model": base, "layer_range": [2, 4]},
                    {"model": ft1, "layer_range": [2, 4], "parameters": {"weight": [0.0, 1.0]}},
                ]
            },
        ],
    }
    b, a = weights["base"], weights["ft1"]
    # Each 2-layer slice runs t over {0, 1}: layers 0 and 2 take none of ft1, layers 1 and 3 all of it.
    weight_by_layer = {None: 0.0, 0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0}
    expected = {name: b[name] + weight_by_layer[tensor_role(name).layer] * (a[name] - b[name]) for name in b}
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_submodule_merge_of_a_vlm_language_tower_with_a_plain_llm(
    tiny_llava, tiny_llama, tmp_path: Path
) -> None:
    from transformers import LlavaForConditionalGeneration

    llm = tiny_llama(3)
    recipe = {
        "method": "linear",
        "models": [
            {"model": str(tiny_llava), "parameters": {"weight": 0.75}},
            {"model": str(llm), "parameters": {"weight": 0.25}},
        ],
        "submodule": {"prefix": "language_model.", "parent_prefix": ""},
    }
    out = tmp_path / "vlm"
    merged = merge(recipe, out)
    vlm, plain = read_tensors(tiny_llava), read_tensors(llm)
    expected = {}
    for name, tensor in vlm.items():
        if name.startswith("language_model."):
            expected[name] = 0.75 * tensor + 0.25 * plain[name.removeprefix("language_model.")]
        else:
            expected[name] = tensor  # vision tower and projector: copied
    assert_all_close(merged, expected)
    assert any(name.startswith("vision_tower.") for name in merged)
    for name in merged:
        if not name.startswith("language_model."):
            assert torch.equal(merged[name], vlm[name]), name
    model = LlavaForConditionalGeneration.from_pretrained(out)
    lm_head = model.get_output_embeddings().weight
    torch.testing.assert_close(lm_head, expected["language_model.lm_head.weight"])


def test_lora_adapter_as_a_parent(tiny_family, weights, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_family["base"]
    torch.manual_seed(11)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    tuned = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}

    recipe = {
        "method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(adapter), "parameters": {"weight": 1.0}},
            {"model": str(tiny_family["ft1"]), "parameters": {"weight": 0.5}},
        ],
    }
    b, a = weights["base"], weights["ft1"]
    expected = {name: tuned[name] + 0.5 * (a[name] - b[name]) for name in b}
    assert any(not torch.equal(tuned[n], b[n]) for n in b if "q_proj" in n)
    assert_all_close(merge(recipe, tmp_path / "out"), expected)


def test_output_dtype_and_config(tiny_family, weights, tmp_path: Path) -> None:
    recipe = {
        "method": "linear",
        "dtype": "bfloat16",
        "models": [{"model": str(tiny_family[k]), "parameters": {"weight": 0.5}} for k in ("ft1", "ft2")],
    }
    out = tmp_path / "bf16"
    merged = merge(recipe, out)
    a, c = weights["ft1"], weights["ft2"]
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, ((a[name] + c[name]) / 2).to(torch.bfloat16))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_recipe_errors_surface_before_any_output(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "never"
    missing_weight = {
        "method": "linear",
        "models": [
            {"model": str(tiny_family["ft1"]), "parameters": {"weight": 1.0}},
            {"model": str(tiny_family["ft2"])},
        ],
    }
    with pytest.raises(ConfigError, match=r"models\[1\]\.parameters: parameter 'weight' of method 'linear' is required"):
        parse_recipe(missing_weight)
    # A filter rule that misses some tensors is only caught per tensor, still before anything is written.
    missing_weight["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": 0.5}]}
    with pytest.raises(ConfigError, match=r"'weight' for model '.*ft2.*' is required but not given \(tensor "):
        run_merge(parse_recipe(missing_weight), out)
    too_deep = {
        "method": "passthrough",
        "slices": [{"sources": [{"model": str(tiny_family["ft1"]), "layer_range": [2, 9]}]}],
    }
    with pytest.raises(ConfigError, match=r"slices\[0\].*exceeds its 4 layers"):
        run_merge(parse_recipe(too_deep), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_overwrite_never_replaces_a_directory_holding_the_recipe(tiny_family, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    recipe_file = project / "configs" / "recipe.yaml"
    recipe_file.write_text("kept")
    recipe = parse_recipe({
        "method": "linear",
        "models": [{"model": str(tiny_family[name]), "parameters": {"weight": 0.5}} for name in ("ft1", "ft2")],
    })
    for out in (project, project / "configs"):
        with pytest.raises(ExportError, match=f"contains {recipe_file}, which writing it would delete"):
            run_merge(recipe, out, overwrite=True, keep=[recipe_file])
    assert recipe_file.read_text() == "kept" and sorted(p.name for p in tmp_path.iterdir()) == ["project"]
