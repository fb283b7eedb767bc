"""PathSpec validation, DFS genome decoding and figure data (pure, no models)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.flow import (
    PathSpec,
    initial_genome,
    path_figure_data,
    path_from_genome,
    slot_layout,
)


def test_slot_layout_repeats_all_sources_in_order() -> None:
    assert slot_layout([2, 1], 2) == [(0, 0), (0, 1), (1, 0), (0, 0), (0, 1), (1, 0)]


def test_initial_genome_decodes_to_model_a_once_with_unit_scales() -> None:
    genome = initial_genome([3, 2], repeats=3)
    assert genome.indicator.shape == (15,)
    assert genome.scales.shape == (6, 5)
    spec = path_from_genome(genome.indicator, genome.scales, [3, 2], 3)
    assert spec.steps == ((0, 0), (0, 1), (0, 2))
    assert spec.scales == (1.0, 1.0, 1.0)


def test_path_from_genome_reads_the_transition_entries() -> None:
    # Sources of 2 and 2 layers: global indices A0=0, A1=1, B0=2, B1=3; row 4 is the embedding row.
    layers, repeats = [2, 2], 2
    indicator = np.full(8, -1.0)
    indicator[[1, 2, 5]] = [0.3, 2.0, 1e-9]  # slots: A1, B0, then A1 again (second repeat)
    scales = np.arange(20, dtype=float).reshape(5, 4) + 1.0
    spec = path_from_genome(indicator, scales, layers, repeats, source_names=["a", "b"])
    assert spec.steps == ((0, 1), (1, 0), (0, 1))
    # embedding -> A1, A1 -> B0, B0 -> A1
    assert spec.scales == (scales[4, 1], scales[1, 2], scales[2, 1])
    assert spec.names == ("a", "b")


def test_gene_at_zero_is_off() -> None:
    indicator = np.array([0.0, 1.0])
    spec = path_from_genome(indicator, np.ones((3, 2)), [2], 1)
    assert spec.steps == ((0, 1),)


@pytest.mark.parametrize(
    ("indicator", "scales", "fragment"),
    [
        (np.ones(5), np.ones((5, 4)), "'indicator' has shape"),
        (np.ones(8), np.ones((4, 4)), "'scales' has shape"),
        (-np.ones(8), np.ones((5, 4)), "'steps' is empty"),
    ],
)
def test_bad_genomes_raise_config_error(indicator: np.ndarray, scales: np.ndarray, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        path_from_genome(indicator, scales, [2, 2], 2)


def test_genome_longer_than_limit_is_refused() -> None:
    with pytest.raises(ConfigError, match="more than the limit of 3"):
        path_from_genome(np.ones(8), np.ones((5, 4)), [2, 2], 2, max_steps=3)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"layers_per_source": (), "steps": ((0, 0),), "scales": (1.0,)}, "'layers_per_source'"),
        ({"layers_per_source": (2,), "steps": ((1, 0),), "scales": (1.0,)}, r"'steps\[0\]' names source 1"),
        (
            {"layers_per_source": (2,), "steps": ((0, 0), (0, 2)), "scales": (1.0, 1.0)},
            r"'steps\[1\]' names layer 2",
        ),
        ({"layers_per_source": (2,), "steps": ((0, 0),), "scales": (1.0, 1.0)}, "'scales' has 2 values"),
        ({"layers_per_source": (2,), "steps": ((0, 0),), "scales": (float("nan"),)}, "not a finite"),
        (
            {"layers_per_source": (2,), "steps": ((0, 0),), "scales": (1.0,), "source_names": ("a", "b")},
            "2 names",
        ),
        ({"layers_per_source": (2,), "steps": (), "scales": ()}, "empty"),
    ],
)
def test_invalid_specs_raise_config_error(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PathSpec(**kwargs)


def test_dict_round_trip_and_malformed_dict() -> None:
    spec = PathSpec((2, 3), ((0, 1), (1, 2), (0, 1)), (0.5, 2.0, 1.0), ("a", "b"))
    assert PathSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="malformed"):
        PathSpec.from_dict({"steps": [[0, 0]]})


def test_figure_data_lists_each_step() -> None:
    spec = PathSpec((2, 2), ((1, 0), (0, 1)), (0.5, 1.5), ("math", "lang"))
    rows = path_figure_data(spec)
    assert [(r.step, r.source, r.source_index, r.layer, r.scale) for r in rows] == [
        (0, "lang", 1, 0, 0.5),
        (1, "math", 0, 1, 1.5),
    ]


@settings(max_examples=60)
@given(
    layers=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    repeats=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_decoded_path_follows_the_on_slots_in_order(layers: list[int], repeats: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    slots = slot_layout(layers, repeats)
    indicator = rng.normal(size=len(slots))
    indicator[rng.integers(len(slots))] = 1.0  # at least one slot on
    num_layers = sum(layers)
    scales = rng.uniform(0.1, 3.0, size=(num_layers + 1, num_layers))
    spec = path_from_genome(indicator, scales, layers, repeats)
    assert list(spec.steps) == [slots[t] for t in range(len(slots)) if indicator[t] > 0]
    offsets = np.cumsum([0, *layers[:-1]])
    globals_ = [num_layers] + [int(offsets[s]) + l for s, l in spec.steps]
    assert list(spec.scales) == [scales[i, j] for i, j in itertools.pairwise(globals_)]
