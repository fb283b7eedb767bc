"""Paired comparisons against textbook values and independent computations."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.evaluate.report import TaskScore
from evomerge.evaluate.stats import exact_mcnemar_p, paired_comparison


def test_exact_mcnemar_matches_hand_computed_binomial_tails():
    # 10 discordant pairs for A, 2 for B: 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert exact_mcnemar_p(10, 2) == pytest.approx(158 / 4096)
    assert exact_mcnemar_p(2, 10) == pytest.approx(158 / 4096)
    # A tie among the discordant pairs is no evidence at all; so is having no discordant pair.
    assert exact_mcnemar_p(6, 6) == 1.0
    assert exact_mcnemar_p(0, 0) == 1.0
    # All 20 discordant pairs one way: 2 / 2**20.
    assert exact_mcnemar_p(20, 0) == pytest.approx(2 / 2**20)


def test_binary_scores_use_mcnemar_on_the_discordant_pairs():
    a = [1] * 30 + [0] * 5 + [1] * 12 + [0] * 53
    b = [1] * 30 + [1] * 5 + [0] * 12 + [0] * 53
    result = paired_comparison(a, b)
    assert result.test == "exact_mcnemar"
    assert (result.a_better, result.b_better, result.n) == (12, 5, 100)
    assert result.difference == pytest.approx(0.07)
    assert result.p_value == pytest.approx(exact_mcnemar_p(12, 5))
    assert result.ci95[0] < 0.07 < result.ci95[1]


def test_interval_matches_the_normal_approximation_of_the_paired_difference():
    rng = random.Random(1)
    a = [float(rng.random() < 0.6) for _ in range(2000)]
    b = [float(rng.random() < 0.5) for _ in range(2000)]
    result = paired_comparison(a, b)
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    sd = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
    half_width = 1.96 * sd / len(diffs) ** 0.5
    assert result.ci95[0] == pytest.approx(mean - half_width, abs=0.006)
    assert result.ci95[1] == pytest.approx(mean + half_width, abs=0.006)


def test_continuous_scores_use_the_paired_bootstrap():
    a = [-1.0 + 0.01 * i for i in range(50)]
    clearly_worse = [value - 0.5 for value in a]
    result = paired_comparison(a, clearly_worse)
    assert result.test == "paired_bootstrap"
    assert result.difference == pytest.approx(0.5)
    assert result.p_value <= 2 / 10_000
    noise = paired_comparison(a, [value + (0.01 if i % 2 else -0.01) for i, value in enumerate(a)])
    assert noise.p_value > 0.5


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison([1, 0], [1])
    with pytest.raises(ValueError, match="at least one"):
        paired_comparison([], [])


@settings(max_examples=40)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=60))
def test_swapping_the_models_negates_the_difference_and_keeps_the_p_value(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    forward, backward = paired_comparison(a, b), paired_comparison(b, a)
    assert forward.difference == pytest.approx(-backward.difference)
    assert forward.p_value == pytest.approx(backward.p_value)
    assert 0.0 < forward.p_value <= 1.0
    assert forward.ci95[0] <= forward.ci95[1]


@given(st.permutations(list(range(12))))
def test_values_in_example_order_pair_two_scores_of_one_split_example_by_example(order):
    # An engine may score examples sorted by length; the value of example i must land at position i.
    values = [index / 10 for index in order]
    score = TaskScore(task="t", score=0.0, stderr=0.0, n=12, values=values, indices=list(order),
                      prompt_tokens=0, generated_tokens=0, seconds=0.0)
    assert score.values_in_example_order() == [index / 10 for index in range(12)]
