"""Parameter schedules: scalars, gradients and filter rules, with mergekit's semantics."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.params import layer_position, resolve_param

MLP = "model.layers.3.mlp.up_proj.weight"
ATTN = "model.layers.3.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def test_scalar_is_constant() -> None:
    assert resolve_param(0.3, MLP, 0.7) == 0.3
    assert resolve_param(True, MLP, 0.2) is True


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75), (1.0, 0.5)])
def test_gradient_interpolates_between_neighbours(t: float, expected: float) -> None:
    # scaled = t * 2 over the anchors [0, 1, 0.5]
    assert resolve_param([0.0, 1.0, 0.5], MLP, t) == pytest.approx(expected)


def test_bool_gradient_selects_by_truncation() -> None:
    assert resolve_param([True, False], MLP, 0.6) is True  # int(0.6 * 1) == 0
    assert resolve_param([True, False], MLP, 1.0) is False


def test_filters_first_substring_match_wins_and_values_may_be_gradients() -> None:
    rules = [
        {"filter": "self_attn", "value": 0.1},
        {"filter": "mlp", "value": [0.0, 1.0]},
        {"filter": "layers", "value": 0.9},  # shadowed by the rules above for attn/mlp tensors
        {"value": 0.5},
    ]
    assert resolve_param(rules, ATTN, 0.5) == 0.1
    assert resolve_param(rules, MLP, 0.25) == pytest.approx(0.25)
    assert resolve_param(rules, EMBED, 0.5) == 0.5
    assert resolve_param(rules, "model.layers.0.input_layernorm.weight", 0.0) == 0.9


def test_unmatched_rules_fall_through_as_none() -> None:
    assert resolve_param([{"filter": "mlp", "value": 1.0}], ATTN, 0.0) is None
    assert resolve_param({"filter": "*", "value": 2.0}, ATTN, 0.0) == 2.0
    assert resolve_param([], ATTN, 0.0) is None


@pytest.mark.parametrize(
    "value",
    ["0.5", [{"filter": "mlp"}], [{"filter": "mlp", "value": {"x": 1}}], [{"value": 1, "filtr": "a"}]],
)
def test_malformed_values_raise_config_error_naming_the_tensor(value: object) -> None:
    with pytest.raises(ConfigError, match="up_proj"):
        resolve_param(value, MLP, 0.0)


@pytest.mark.parametrize(
    ("layer", "num_layers", "t"), [(0, 4, 0.0), (1, 4, 1 / 3), (3, 4, 1.0), (0, 1, 1.0), (None, 4, 0.0)]
)
def test_layer_position_matches_mergekit_planner(layer: int | None, num_layers: int, t: float) -> None:
    assert layer_position(layer, num_layers) == pytest.approx(t)


def test_layer_position_rejects_out_of_range_layers() -> None:
    with pytest.raises(ValueError):
        layer_position(4, 4)
