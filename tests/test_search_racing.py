"""Racing: slices, optimistic bounds and the entry threshold."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from evomerge.search.racing import entry_threshold, optimistic_stderr, plan_race, still_competitive


def test_plan_splits_every_task_into_disjoint_covering_parts():
    plan = plan_race({"a": 10, "b": 3}, fraction=0.25, seed=0)
    for task, size in {"a": 10, "b": 3}.items():
        assert sorted(plan.first[task] + plan.rest[task]) == list(range(size))
        assert not set(plan.first[task]) & set(plan.rest[task])
    assert len(plan.first["a"]) == 3 and len(plan.first["b"]) == 1
    assert plan == plan_race({"a": 10, "b": 3}, fraction=0.25, seed=0)
    assert plan.first != plan_race({"a": 10, "b": 3}, fraction=0.25, seed=1).first


def test_agresti_coull_error_stays_positive_at_zero_and_one():
    # (0 + 2) / (10 + 4) = 1/7; sqrt(1/7 * 6/7 / 14)
    assert math.isclose(optimistic_stderr([0.0] * 10), math.sqrt((1 / 7) * (6 / 7) / 14))
    assert math.isclose(optimistic_stderr([1.0] * 10), optimistic_stderr([0.0] * 10))
    assert math.isclose(optimistic_stderr([0.5, 1.5]), math.sqrt(0.5 / 2))


def test_threshold_is_the_kth_best_once_k_are_known():
    assert entry_threshold([0.1, 0.5], top_k=3) is None
    assert entry_threshold([0.1, 0.5, 0.3, 0.9], top_k=3) == 0.3


def test_competitive_when_optimistic_bound_reaches_threshold():
    assert still_competitive(0.2, 0.05, None, 2.0)
    assert still_competitive(0.2, 0.05, 0.3, 2.0)
    assert not still_competitive(0.2, 0.04, 0.3, 2.0)


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200))
def test_binary_stderr_is_finite_and_positive(values):
    error = optimistic_stderr(values)
    assert 0 < error < 0.5
