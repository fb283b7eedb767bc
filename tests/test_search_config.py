"""Evolve config validation: every mistake named in one sentence before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.search.config import parse_evolve_config
from evomerge.search.samplers import cmaes_population, population_size


def config(tmp_path: Path, **overrides) -> dict:
    (tmp_path / "t.yaml").write_text("name: t")
    data = {
        "base_model": "base",
        "parents": ["a", "b"],
        "method": "dare_ties",
        "genome": {"weight": {"bounds": [0, 1], "granularity": "per_layer"}},
        "objectives": [{"task": "t.yaml"}],
    }
    data.update(overrides)
    return data


def parse(tmp_path: Path, **overrides):
    return parse_evolve_config(config(tmp_path, **overrides), source="evolve.yaml", root=tmp_path)[0]


def test_valid_config_defaults_to_the_papers_cmaes(tmp_path):
    parsed = parse(tmp_path)
    assert parsed.resolved_optimizer == "cmaes"
    assert parsed.sigma0 == pytest.approx(1 / 6)
    assert cmaes_population(10) == 4 + 6  # 4 + floor(3 ln 10) = 4 + 6
    assert population_size(parsed, 10) == 10


# A misspelt parameter, reversed bounds, a missing task file and malformed YAML: tests/test_bad_inputs.py.
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"genome": {"weight": {"bounds": [0, 1], "granularity": "per_block"}}}, "needs a block_size"),
        ({"budget": {"candidates": 0}}, "budget.candidates"),
        ({"optimizer": "nsga2"}, "optimizer 'nsga2' needs `combine: pareto`"),
        ({"genome": {"density": {"bounds": [0, 2]}}, "fixed": {"weight": 1.0}}, "exceed the parameter's valid range [0, 1]"),
        ({"genome": {"normalize": {"bounds": [0, 1]}}, "fixed": {"weight": 1.0}}, "genome.normalize is a true/false switch"),
        ({"popsize": 3}, "unknown key 'popsize'"),
    ],
)
def test_invalid_configs_fail_with_one_sentence(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as error:
        parse(tmp_path, **overrides)
    assert fragment in str(error.value)
    assert "evolve.yaml" in str(error.value)
