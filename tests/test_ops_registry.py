"""Operator registry: lookup, suggestions, declared metadata and parameter validation."""

from __future__ import annotations

import math

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.registry import ParamSpec, check_params, get_operator, operator, operator_names

MERGEKIT_SHARED = {
    "linear", "task_arithmetic", "slerp", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "passthrough",
}  # fmt: skip


def test_builtins_are_registered_with_their_space_and_randomness() -> None:
    assert MERGEKIT_SHARED <= set(operator_names())
    random_ops = {name for name in operator_names() if get_operator(name).is_random}
    assert random_ops == {"dare_linear", "dare_ties", "della", "della_linear"}
    weight_space = {name for name in operator_names() if get_operator(name).space == "weights"}
    assert weight_space == {"linear", "slerp", "passthrough"}
    assert not get_operator("linear").needs_base and get_operator("slerp").needs_base


@pytest.mark.parametrize(
    ("name", "normalize", "rescale"),
    [  # mergekit 0.1.5 defaults, read from its registry
        ("task_arithmetic", False, False), ("ties", True, False), ("dare_ties", False, True),
        ("dare_linear", False, True), ("breadcrumbs", False, False), ("breadcrumbs_ties", False, False),
        ("della", True, True), ("della_linear", False, True),
    ],
)  # fmt: skip
def test_defaults_follow_mergekit(name: str, normalize: bool, rescale: bool) -> None:
    spec = get_operator(name)
    assert spec.param("normalize").default is normalize
    assert spec.param("rescale").default is rescale
    assert spec.param("lambda").default == 1.0
    assert spec.param("weight").required


def test_unknown_operator_suggests_the_nearest_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'dare_ties'"):
        get_operator("dare-ties")


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        operator("ties", space="delta")(lambda base, deltas, **_: base)


def test_validate_fills_defaults_and_broadcasts_per_model_scalars() -> None:
    params = check_params("ties", get_operator("ties").params, {"weight": 0.5}, num_models=3)
    assert params == {
        "weight": [0.5] * 3,
        "density": [1.0] * 3,
        "normalize": True,
        "rescale": False,
        "lambda": 1.0,
    }


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"weight": 1.0, "density": 1.5}, r"'density' of 'ties' must lie in \[0, 1\], got 1.5"),
        ({"weight": 1.0, "density": [0.5, -0.1]}, r"'density' .* \[0, 1\], got -0.1"),
        ({"weight": [1.0]}, "has 1 values for 2 models"),
        ({"density": 0.5}, "needs a value for parameter 'weight'"),
        ({"weight": 1.0, "densty": 0.5}, "did you mean 'density'"),
        ({"weight": 1.0, "normalize": 1}, "'normalize' of 'ties' must be true or false"),
        ({"weight": 1.0, "lambda": [1.0, 2.0]}, "'lambda' of 'ties' must be a number"),
        ({"weight": math.nan}, "'weight' of 'ties' must lie in"),
    ],
)
def test_validation_names_the_parameter_and_range(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_params("ties", get_operator("ties").params, params, num_models=2)


def test_search_bounds_come_from_the_spec() -> None:
    ties = get_operator("ties")
    assert ties.param("density").search_bounds() == (0.0, 1.0)
    assert ties.param("weight").search_bounds() == (0.0, 1.0)
    with pytest.raises(ConfigError, match="no finite search range"):
        ParamSpec("w", 1.0).search_bounds()
