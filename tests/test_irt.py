"""The 2PL fit, ability estimate and anchors against an independent simulation with known parameters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.search.irt import estimate_ability, fit_2pl, predicted_accuracy, select_anchors


def simulate(models: int, items: int, seed: int):
    """Answers drawn from a 2PL model whose parameters the fit never sees."""
    rng = np.random.default_rng(seed)
    a = np.exp(rng.normal(0.0, 0.3, items))
    b = rng.normal(0.0, 1.0, items)
    theta = rng.normal(0.0, 1.0, models)
    p = 1 / (1 + np.exp(-a * (theta[:, None] - b)))
    return (rng.random((models, items)) < p).astype(float), a, b, theta


def test_fit_recovers_known_item_parameters():
    answers, a, b, theta = simulate(400, 80, seed=3)
    fit = fit_2pl(answers)
    assert np.corrcoef(fit.b, b)[0, 1] > 0.95
    assert np.corrcoef(fit.a, a)[0, 1] > 0.6
    assert np.corrcoef(fit.theta, theta)[0, 1] > 0.95
    # Each model's fitted accuracy tracks its simulated expected accuracy (the quantity later estimated)
    # as closely as 80 observed answers allow: the binomial error of the raw mean is about 0.05.
    expected = (1 / (1 + np.exp(-a * (theta[:, None] - b)))).mean(1)
    assert np.sqrt(np.mean((fit.probabilities(fit.theta).mean(1) - expected) ** 2)) < 0.05


def test_fit_skips_missing_answers():
    answers, _, b, _ = simulate(300, 40, seed=4)
    holey = answers.copy()
    holey[np.random.default_rng(0).random(holey.shape) < 0.3] = np.nan
    assert np.corrcoef(fit_2pl(holey).b, b)[0, 1] > 0.9


@pytest.mark.parametrize("method", ["stratified", "clustered"])
def test_anchor_estimate_beats_the_plain_subset_mean(method):
    """A new model's full accuracy from 30 of 300 answers: IRT's error is smaller than the subset mean's."""
    answers, a, b, _ = simulate(200, 300, seed=5)
    fit = fit_2pl(answers)
    anchors = select_anchors(answers, 30, seed=0, method=method)
    rng = np.random.default_rng(6)
    irt_errors, subset_errors = [], []
    for theta in rng.normal(0.0, 1.0, 200):
        p = 1 / (1 + np.exp(-a * (theta - b)))
        y = (rng.random(300) < p).astype(float)
        ability = estimate_ability(fit, anchors, y[anchors], prior_mean=0.0, prior_sd=1.0)
        irt_errors.append(predicted_accuracy(fit, anchors, y[anchors], ability) - p.mean())
        subset_errors.append(y[anchors].mean() - p.mean())
    irt_rmse, subset_rmse = np.sqrt(np.mean(np.square(irt_errors))), np.sqrt(np.mean(np.square(subset_errors)))
    assert irt_rmse < subset_rmse
    assert irt_rmse < 0.075  # binomial error of 30 answers near p = 0.5, with the finite-split correction


def test_ability_is_shrunk_to_the_prior_without_evidence():
    answers, *_ = simulate(50, 20, seed=7)
    fit = fit_2pl(answers)
    assert estimate_ability(fit, np.array([], dtype=int), np.array([]), prior_mean=0.7, prior_sd=1.0) == 0.7


@pytest.mark.parametrize("method", ["stratified", "clustered"])
def test_anchors_are_distinct_seeded_and_in_range(method):
    answers, *_ = simulate(12, 100, seed=8)
    first = select_anchors(answers, 15, seed=1, method=method)
    assert len(set(first.tolist())) == 15 and first.min() >= 0 and first.max() < 100
    assert np.array_equal(first, select_anchors(answers, 15, seed=1, method=method))


@settings(max_examples=25)
@given(st.integers(2, 8), st.integers(1, 40), st.integers(1, 45), st.integers(0, 2**16),
       st.sampled_from(["stratified", "clustered"]))
def test_anchor_count_invariant(models, items, k, seed, method):
    """Exactly min(k, items) distinct anchors, whatever the (possibly degenerate, duplicated) answers."""
    answers = (np.random.default_rng(seed).random((models, items)) < 0.5).astype(float)
    anchors = select_anchors(answers, k, seed=seed, method=method)
    assert len(anchors) == len(set(anchors.tolist())) == min(k, items)


@settings(max_examples=40)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12), st.integers(0, 2**16), st.floats(-1.0, 1.0))
def test_graded_answers_give_the_root_of_the_quasi_likelihood_score(answers, seed, prior_mean):
    """With answers in [0, 1] (answer probabilities), the ability is where the penalised Bernoulli
    quasi-likelihood's derivative is zero (found here by bracketing, not Newton), and it never falls when
    an answer rises."""
    from scipy.optimize import brentq

    responses, *_ = simulate(30, 12, seed=seed % 1000)
    fit = fit_2pl(responses)
    items = np.arange(len(answers))
    y = np.array(answers)
    a, b = fit.a[items], fit.b[items]

    def score(theta: float) -> float:
        return float(a @ (y - 1 / (1 + np.exp(-a * (theta - b))))) - (theta - prior_mean) / 1.0**2

    theta = estimate_ability(fit, items, y, prior_mean=prior_mean, prior_sd=1.0)
    assert theta == pytest.approx(brentq(score, -30, 30, xtol=1e-12), abs=1e-6)
    higher = np.minimum(y + 0.3, 1.0)
    assert estimate_ability(fit, items, higher, prior_mean=prior_mean, prior_sd=1.0) >= theta - 1e-9
