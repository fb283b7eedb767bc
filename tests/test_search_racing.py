"""Racing: slices, optimistic bounds and the entry threshold."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from evomerge.search.racing import (
    entry_threshold,
    interval_centre_and_stderr,
    optimistic_bound,
    plan_race,
    race,
    still_competitive,
)


def test_plan_rounds_partition_each_split_in_a_seeded_order():
    plan = plan_race({"a": 300, "b": 3}, fraction=0.125, seed=0, growth=2.0)
    # a: ceil(300/8)=38, ceil(300/4)=75, 150, 300; b: 1, 1, 2, 3 (b's empty second round is simply absent).
    assert [cut["a"] for cut in plan.cuts] == [38, 75, 150, 300]
    assert [cut["b"] for cut in plan.cuts] == [1, 1, 2, 3]
    rounds = [plan.round_indices(r) for r in range(plan.rounds)]
    assert "b" not in rounds[1]
    for task, size in {"a": 300, "b": 3}.items():
        scored = [i for r in rounds for i in r.get(task, [])]
        assert sorted(scored) == list(range(size))  # every example exactly once
    assert plan == plan_race({"a": 300, "b": 3}, fraction=0.125, seed=0, growth=2.0)
    assert plan.order["a"] != plan_race({"a": 300, "b": 3}, fraction=0.125, seed=1).order["a"]


def test_rounds_that_add_nothing_are_merged():
    plan = plan_race({"a": 4}, fraction=0.1, seed=0, growth=1.5)
    # shares 0.1, 0.15, 0.225, 0.3375 all cut at 1 or 2 examples of 4: distinct cuts only.
    assert [cut["a"] for cut in plan.cuts] == [1, 2, 3, 4]
    assert plan_race({"a": 4}, fraction=0.5, seed=0, growth=100.0).cuts == [{"a": 2}, {"a": 4}]


def test_one_binary_task_gets_the_agresti_coull_upper_bound():
    # 0 of 4 at z = 2: n~ = 8, p~ = 2/8, bound = 0.25 + 2 * sqrt(0.25 * 0.75 / 8) = 0.556 (by hand).
    assert math.isclose(optimistic_bound({"t": [0.0] * 4}, {"t": 1.0}, 2.0), 0.25 + 2 * math.sqrt(0.1875 / 8))
    assert math.isclose(optimistic_bound({"t": [0.0] * 4}, {"t": 1.0}, 2.0), 0.5562, abs_tol=1e-4)
    # 30 of 40 at z = 1.96 (textbook Agresti-Coull): n~ = 43.84, p~ = 31.92 / 43.84.
    n_adj = 40 + 1.96**2
    p_adj = (30 + 1.96**2 / 2) / n_adj
    expected = p_adj + 1.96 * math.sqrt(p_adj * (1 - p_adj) / n_adj)
    assert math.isclose(optimistic_bound({"t": [1.0] * 30 + [0.0] * 10}, {"t": 1.0}, 1.96), expected)


def test_bound_combines_signed_weights_and_independent_errors():
    values = {"x": [1.0, 0.0, 1.0, 1.0], "y": [0.5, 0.25, 1.0, 0.25]}
    (cx, sx), (cy, sy) = interval_centre_and_stderr(values["x"], 2.0), interval_centre_and_stderr(values["y"], 2.0)
    assert math.isclose(cy, 0.5)  # continuous values: the plain mean and its standard error
    assert math.isclose(sy, math.sqrt(sum((v - 0.5) ** 2 for v in values["y"]) / 3 / 4))
    bound = optimistic_bound(values, {"x": 2.0, "y": -1.0}, 2.0)
    assert math.isclose(bound, 2 * cx - cy + 2 * math.hypot(2 * sx, sy))


class Recorder:
    """A candidate whose example values are fixed; records which examples the race asked for."""

    def __init__(self, values: dict[str, list[float]]):
        self.values = values
        self.calls: list[dict[str, list[int]]] = []
        self.seen: dict[str, list[float]] = {}

    def __call__(self, indices):
        self.calls.append(indices)
        for task, idx in indices.items():
            self.seen.setdefault(task, []).extend(self.values[task][i] for i in idx)
        return self.seen


def test_race_drops_a_hopeless_candidate_after_the_first_round():
    plan = plan_race({"t": 200}, fraction=0.125, seed=0)
    candidate = Recorder({"t": [0.0] * 200})
    assert race(plan, candidate, {"t": 1.0}, threshold=0.6, z=2.0)
    assert len(candidate.calls) == 1 and len(candidate.seen["t"]) == 25
    # Agresti-Coull bound at 0/25: 1/14.5 + 2 * sqrt(...) is about 0.17, far below 0.6.


def test_race_scores_everything_for_a_strong_candidate_and_without_threshold():
    plan = plan_race({"t": 200}, fraction=0.125, seed=0)
    strong = Recorder({"t": [1.0] * 200})
    assert not race(plan, strong, {"t": 1.0}, threshold=0.6, z=2.0)
    assert len(strong.calls) == plan.rounds == 4 and sorted(strong.seen["t"]) == [1.0] * 200
    weak = Recorder({"t": [0.0] * 200})
    assert not race(plan, weak, {"t": 1.0}, threshold=None, z=2.0)
    assert weak.calls == [{"t": list(range(200))}]  # one call: nothing can be dropped yet


def test_race_drops_only_once_the_bound_falls_below_the_threshold():
    plan = plan_race({"t": 400}, fraction=0.125, seed=0)
    values = [float(i % 2) for i in range(400)]  # a 50% candidate

    def bound(n: int) -> float:  # Agresti-Coull optimistic bound on the first n examples of the order
        hits = sum(values[i] for i in plan.order["t"][:n])
        p = (hits + 2) / (n + 4)  # Agresti-Coull at z = 2, written out independently
        return p + 2.0 * math.sqrt(p * (1 - p) / (n + 4))

    expected_rounds = next(r + 1 for r, cut in enumerate(plan.cuts) if bound(cut["t"]) < 0.64)
    assert 1 < expected_rounds < plan.rounds  # the case is the interesting one: survives round one, dropped later
    candidate = Recorder({"t": values})
    assert race(plan, candidate, {"t": 1.0}, threshold=0.64, z=2.0)
    assert len(candidate.calls) == expected_rounds
    assert len(candidate.seen["t"]) == plan.cuts[expected_rounds - 1]["t"]


def test_agresti_coull_error_stays_positive_at_zero_and_one():
    # (0 + 2) / (10 + 4) = 1/7; sqrt(1/7 * 6/7 / 14)
    assert interval_centre_and_stderr([0.0] * 10, 2.0) == (1 / 7, math.sqrt((1 / 7) * (6 / 7) / 14))
    assert math.isclose(interval_centre_and_stderr([1.0] * 10, 2.0)[1], interval_centre_and_stderr([0.0] * 10, 2.0)[1])
    assert math.isclose(interval_centre_and_stderr([0.5, 1.5], 2.0)[1], math.sqrt(0.5 / 2))


def test_threshold_is_the_kth_best_once_k_are_known():
    assert entry_threshold([0.1, 0.5], top_k=3) is None
    assert entry_threshold([0.1, 0.5, 0.3, 0.9], top_k=3) == 0.3


def test_competitive_when_optimistic_bound_reaches_threshold():
    assert still_competitive(0.2, None)
    assert still_competitive(0.3, 0.3)
    assert not still_competitive(0.29, 0.3)


@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=1, max_size=200))
def test_binary_stderr_is_finite_and_positive(values):
    _, error = interval_centre_and_stderr(values, 2.0)
    assert 0 < error < 0.5
