"""Recipes: both YAML dialects, round trips, and one clear sentence for every mistake a user can make."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.merge.recipe import FilterRule, Recipe, load_recipe, parse_recipe

OURS = """
method: ties
base_model: /m/base
models:
  - model: /m/a
    parameters: {weight: [0.2, 0.8], density: 0.5}
  - model: /m/b
    parameters:
      weight:
        - {filter: self_attn, value: 0.3}
        - {value: 0.6}
parameters: {lambda: 1.1, normalize: false}
dtype: bfloat16
seed: 7
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_our_format_parses_every_value_form(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, OURS))
    assert recipe.method == "ties" and recipe.base_model == "/m/base" and recipe.seed == 7
    assert recipe.models[0].parameters == {"weight": [0.2, 0.8], "density": 0.5}
    rules = recipe.models[1].parameters["weight"]
    assert rules == [FilterRule(filter="self_attn", value=0.3), FilterRule(value=0.6)]
    assert recipe.parameters == {"lambda": 1.1, "normalize": False}
    assert recipe.dtype == "bfloat16"


def test_mergekit_format_is_detected_and_translated() -> None:
    mergekit = {
        "merge_method": "dare_ties",
        "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"weight": 0.5, "density": 0.4}}],
        "parameters": {"int8_mask": True, "normalize": True},
        "tokenizer": {"source": "/m/a"},
        "chat_template": "chatml",
        "dtype": "float16",
    }
    recipe = parse_recipe(mergekit)
    assert recipe.method == "dare_ties"
    # Memory/logging-only keys are dropped; the tokenizer block becomes `tokenizer_source`.
    assert recipe.parameters == {"normalize": True}
    assert recipe.tokenizer_source == "/m/a"
    assert recipe.dtype == "float16"


def test_yaml_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, OURS))
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe
    mergekit = yaml.safe_load(recipe.to_mergekit_yaml())
    assert mergekit["merge_method"] == "ties" and "method" not in mergekit and "seed" not in mergekit
    # mergekit's YAML is itself a valid recipe for us, with the same numbers (seed aside).
    assert parse_recipe(mergekit) == recipe.model_copy(update={"seed": 0})


def test_mergekit_yaml_is_omitted_where_mergekit_cannot_express_the_merge() -> None:
    submodule = parse_recipe(
        {
            "method": "linear",
            "models": [
                {"model": "/vlm", "parameters": {"weight": 1}},
                {"model": "/llm", "parameters": {"weight": 1}},
            ],
            "submodule": {"prefix": "language_model.", "parent_prefix": ""},
        }
    )
    assert submodule.to_mergekit_yaml() is None


def test_parent_refs_and_donor() -> None:
    recipe = parse_recipe(
        {
            "method": "passthrough",
            "slices": [
                {"sources": [{"model": "/b", "layer_range": [0, 2]}]},
                {"sources": [{"model": "/a", "layer_range": [0, 2]}]},
                {"sources": [{"model": "/b", "layer_range": [2, 4]}]},
            ],
        }
    )
    assert recipe.parent_refs() == ["/b", "/a"]  # first appearance, no repeats
    assert recipe.donor_ref() == "/b"
    with_base = parse_recipe(
        {
            "method": "task_arithmetic",
            "base_model": "/base",
            "tokenizer_source": "/a",
            "models": [{"model": "/a", "parameters": {"weight": 1}}],
        }
    )
    assert with_base.parent_refs() == ["/base", "/a"]
    assert with_base.donor_ref() == "/a"


# --- mistakes: each is one sentence naming the file and the field --------------------------------
# (Through the CLI, with an unknown method and malformed YAML among them: tests/test_bad_inputs.py.)


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    return message


def test_unknown_top_level_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = error_of(tmp_path, "method: linear\nbase_modle: /a\nmodels: [{model: /a}]\n")
    assert "base_modle" in message and "did you mean 'base_model'" in message


def test_unknown_nested_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = error_of(tmp_path, "method: linear\nmodels: [{model: /a, paramters: {weight: 1}}]\n")
    assert "models[0].paramters" in message and "did you mean 'parameters'" in message


def test_unknown_parameter_suggests_the_nearest(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, "method: ties\nbase_model: /b\nmodels: [{model: /a, parameters: {densty: 0.5}}]\n"
    )
    assert "models[0].parameters" in message and "did you mean 'density'" in message


def test_parameter_out_of_range_names_it_and_the_range(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, "method: ties\nbase_model: /b\nmodels: [{model: /a, parameters: {density: [0.5, 1.5]}}]\n"
    )
    assert "'density' = 1.5" in message and "[0, 1]" in message


def test_out_of_range_inside_a_filter_rule(tmp_path: Path) -> None:
    text = "method: slerp\nbase_model: /b\nmodels: [{model: /b}, {model: /a}]\nparameters: {t: [{filter: mlp, value: 2}]}\n"
    assert "'t' = 2" in error_of(tmp_path, text)


def test_global_parameter_set_per_model(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, "method: ties\nbase_model: /b\nmodels: [{model: /a, parameters: {lambda: 1}}]\n"
    )
    assert "'lambda'" in message and "global" in message


def test_method_needing_a_base(tmp_path: Path) -> None:
    assert "needs a `base_model`" in error_of(tmp_path, "method: ties\nmodels: [{model: /a}]\n")


def test_tokenizer_source_must_be_a_parent(tmp_path: Path) -> None:
    text = "method: linear\ntokenizer_source: /z\nmodels: [{model: /a, parameters: {weight: 1}}]\n"
    assert "'tokenizer_source'" in error_of(tmp_path, text)


def test_models_and_slices_are_exclusive(tmp_path: Path) -> None:
    text = "method: passthrough\nmodels: [{model: /a}]\nslices: [{sources: [{model: /a, layer_range: [0, 1]}]}]\n"
    assert "not both" in error_of(tmp_path, text)


def test_slice_sources_must_have_equal_lengths(tmp_path: Path) -> None:
    text = (
        "method: linear\nslices:\n  - sources:\n"
        "    - {model: /a, layer_range: [0, 2]}\n    - {model: /b, layer_range: [0, 3]}\n"
    )
    message = error_of(tmp_path, text)
    assert "slices[0]" in message and "same number of layers" in message


def test_layer_range_must_be_ordered(tmp_path: Path) -> None:
    text = "method: passthrough\nslices: [{sources: [{model: /a, layer_range: [3, 1]}]}]\n"
    assert "layer_range" in error_of(tmp_path, text)


def test_not_a_mapping_and_no_method(tmp_path: Path) -> None:
    assert "mapping" in error_of(tmp_path, "- just\n- a list\n")
    assert "missing field 'method'" in error_of(tmp_path, "models: [{model: /a}]\n")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("/nonexistent/recipe.yaml")


def test_bool_is_not_silently_a_number() -> None:
    # `normalize: true` stays a flag (StrictBool first), a number stays a number.
    recipe = parse_recipe(
        {
            "method": "linear",
            "models": [{"model": "/a", "parameters": {"weight": 1}}],
            "parameters": {"normalize": True},
        }
    )
    assert recipe.parameters["normalize"] is True
    assert isinstance(recipe.models[0].parameters["weight"], float)


def test_recipe_is_frozen() -> None:
    recipe = parse_recipe({"method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1}}]})
    with pytest.raises(ValidationError):
        recipe.method = "ties"  # type: ignore[misc]
    assert isinstance(recipe, Recipe)
