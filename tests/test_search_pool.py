"""Parents from a pool: the selection rule, the pool genome (selection -> merged parents), the screen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_llama
from evomerge.errors import CompatibilityError, ConfigError
from evomerge.merge import StreamingMerge
from evomerge.pipelines.demo import demo_config
from evomerge.report.extras import extra_sections
from evomerge.search.config import parse_evolve_config
from evomerge.search.genome import ParameterGenome
from evomerge.search.pool import SELECTED_AT, covering_choice, screen_pool, selected
from evomerge.search.run import SearchRun
from evomerge.search.session import SearchSession
from evomerge.search.store import prepare_run_dir
from evomerge.zoo.pool import build_pool_zoo


@pytest.fixture(scope="module")
def pool_zoo(zoo):
    return build_pool_zoo(zoo)


@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8), st.integers(1, 8))
def test_selection_rule(genes, max_parents):
    chosen = selected(genes, max_parents)
    assert chosen == sorted(set(chosen)) and 1 <= len(chosen) <= max_parents
    if all(g < 0.5 for g in genes):
        assert chosen == [max(range(len(genes)), key=lambda i: (genes[i], -i))]
    else:
        assert all(genes[i] >= 0.5 for i in chosen)
        # Nobody left out is preferred to someone chosen.
        assert all(genes[j] <= min(genes[i] for i in chosen) for j in set(range(len(genes))) - set(chosen))


def pool_config(zoo, tmp_path, pool, **extra):
    data = demo_config(zoo, candidates=4) | {"parents_pool": [str(p) for p in pool], "max_parents": 2} | extra
    del data["parents"]
    return parse_evolve_config(data, source="evolve.yaml", root=tmp_path)


def test_a_candidate_merges_only_its_selected_parents(zoo, tmp_path):
    math, language, strings = (zoo.specialists[n] for n in ("math", "language", "strings"))
    config, root = pool_config(zoo, tmp_path, [math, language, strings])
    session = SearchSession(config, root)
    genome = session.genome
    assert [g.name for g in genome.genes if g.param == "select"] == ["select.math", "select.language", "select.strings"]
    values = genome.initial() | {"select.math": 0.9, "select.language": 0.2, "select.strings": 0.7, "weight.strings.layer1": 0.3}
    recipe = session.decode(values)
    assert [entry.model for entry in recipe.models] == [str(math), str(strings)]
    # The same genes for a hand-picked search over those two parents (no pool), merged by the streaming
    # merger instead of the pool's in-memory one: the same weights.
    hand_config, _ = parse_evolve_config(demo_config(zoo), source="evolve.yaml", root=tmp_path)
    donor = session.merger.donor
    hand = ParameterGenome(hand_config.model_copy(update={"parents": [str(math), str(strings)]}),
                           recipe.operator, [str(math), str(strings)], donor.tensor_names(), donor.model_type,
                           donor.num_layers)
    by_hand = hand.decode({name: values[name] for name in hand.names}, seed=0)  # genes named by parent
    expected = {job.out_name: tensor for job, tensor in StreamingMerge(by_hand, device="cpu", compute_dtype=torch.float32)}
    merged = dict(session.merger.tensors(recipe))
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor)
    # Every selection gene below 0.5: the single most selected model alone.
    low = values | {"select.math": 0.1, "select.language": 0.4, "select.strings": 0.3}
    assert [entry.model for entry in session.decode(low).models] == [str(language)]


def test_the_screen_leaves_out_a_model_of_another_base(zoo, pool_zoo, tmp_path):
    math = zoo.specialists["math"]
    screen = screen_pool(str(zoo.base), [str(math), str(pool_zoo.models["other_base"])], max_distance=0.5)
    assert list(screen.rejected) == [str(pool_zoo.models["other_base"])] and screen.kept == [str(math)]
    assert screen.cosine[0][0] == pytest.approx(1.0) and abs(screen.cosine[0][1]) < 0.2
    config, root = pool_config(zoo, tmp_path, [math, pool_zoo.models["other_base"], pool_zoo.models["degraded"]])
    session = SearchSession(config, root)
    assert session.genome.merged_models == [str(math), str(pool_zoo.models["degraded"])]
    assert list(session.evidence()["pool_screen"]["rejected"]) == [str(pool_zoo.models["other_base"])]


def test_the_pool_refuses_a_model_of_another_shape(zoo, tmp_path):
    stranger = make_llama(tmp_path / "stranger", seed=1)
    with pytest.raises(CompatibilityError):
        screen_pool(str(zoo.base), [str(zoo.specialists["math"]), str(stranger)], max_distance=0.5)


@pytest.mark.parametrize("change, message", [
    ({"parents": ["a"]}, "either `parents` or `parents_pool`"),
    ({"base_model": None}, "needs a `base_model`"),
])
def test_pool_config_errors_name_the_field(zoo, tmp_path, change, message):
    data = demo_config(zoo) | {"parents_pool": [str(p) for p in zoo.specialists.values()]}
    del data["parents"]
    with pytest.raises(ConfigError, match=message):
        parse_evolve_config(data | change, source="evolve.yaml", root=tmp_path)
    with pytest.raises(ConfigError, match="max_parents"):
        parse_evolve_config(demo_config(zoo) | {"max_parents": 2}, source="evolve.yaml", root=tmp_path)


def test_covering_choice_takes_complementary_models_and_leaves_out_copies():
    answers = [
        {"t": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]},  # a specialist
        {"t": [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]},  # its degraded copy: a subset of its answers
        {"t": [0] * 10},  # an irrelevant skill
        {"t": [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]},  # a second specialist
        None,  # failed when scored
        {"t": [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]},  # a third
    ]
    assert covering_choice(answers, [("t", 1.0)], 3) == [0, 3, 5]
    assert covering_choice(answers, [("t", 1.0)], 2) == [0, 3]
    assert covering_choice(answers, [("t", 1.0)], 6) == [0, 3, 5]  # nobody else adds an answer
    assert covering_choice([None, None], [("t", 1.0)], 2) == []
    # Nothing answered at all: the single (first) best model still starts selected.
    assert covering_choice([{"t": [0, 0]}, {"t": [0, 0]}], [("t", 1.0)], 2) == [0]


def test_covering_choice_minimises_a_minimised_objective_and_weighs_tasks():
    losses = [{"loss": [1.0, 0.2]}, {"loss": [0.1, 0.9]}, {"loss": [0.5, 0.5]}]
    assert covering_choice(losses, [("loss", -1.0)], 3) == [0, 1]  # best of both: 0.1 and 0.2
    assert covering_choice(losses, [("loss", -1.0)], 1) == [1]  # mean 0.5, ties with 2: lower index
    weighted = [{"a": [1, 1], "b": [0, 0]}, {"a": [0, 0], "b": [1, 1]}]
    assert covering_choice(weighted, [("a", 0.2), ("b", 0.8)], 1) == [1]


@given(st.lists(st.lists(st.integers(0, 1), min_size=6, max_size=6), min_size=1, max_size=6), st.integers(1, 6))
def test_covering_choice_stops_only_when_nothing_adds(rows, max_parents):
    table = np.array(rows, dtype=float)
    chosen = covering_choice([{"t": row} for row in rows], [("t", 1.0)], max_parents)
    assert 1 <= len(chosen) <= max_parents and chosen == sorted(set(chosen))
    covered = table[chosen].max(axis=0)
    assert covered.mean() >= table.mean(axis=1).max()  # at least the best single model
    if len(chosen) < max_parents:  # stopped early: no other model answers anything new
        assert all((np.maximum(covered, table[i]) == covered).all() for i in range(len(rows)))


def test_a_pool_search_starts_from_the_specialists_not_the_distractors(zoo, pool_zoo, tmp_path):
    """Pool order puts distractors first, where the configured start (every gene at the threshold, ties to
    the lower index) would select them; the parents' own search-split answers pick the specialists."""
    pool = [pool_zoo.models["backwards"], pool_zoo.models["degraded"], *zoo.specialists.values(),
            pool_zoo.models["other_base"]]
    config, root = pool_config(zoo, tmp_path, pool, max_parents=3)
    prepare_run_dir(config, tmp_path / "run")
    run = SearchRun(config, root, tmp_path / "run")
    x0 = run.start()
    started = {g.model for g in run.genome.genes if g.param == "select" and x0[g.name] >= SELECTED_AT}
    assert started == {str(p) for p in zoo.specialists.values()}
    assert run.genome.selected_models(x0) == [str(p) for p in zoo.specialists.values()]
    assert run.store.x0 == x0
    (section,) = [s for s in extra_sections(run.store) if s[0] == "pool"]
    assert "CMA-ES started with these selected" in section[2] and "math, language, strings" in section[2]
