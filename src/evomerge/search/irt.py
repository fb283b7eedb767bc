"""Item response theory for cheap fitness: a 2PL fit, abilities, anchor examples, predicted accuracy.

The two-parameter logistic model: model j answers example i correctly with probability
``sigmoid(a_i * (theta_j - b_i))`` (discrimination ``a_i > 0``, difficulty ``b_i``, ability ``theta_j``).
The fit is a joint maximum a posteriori estimate by alternating Fisher scoring (numpy only): with a few
dozen models per fit, priors keep an example every model got right (or wrong) at a finite difficulty —
``theta ~ N(0, 1)`` (which also fixes the scale), ``log a ~ N(0, 0.5²)``, ``b ~ N(0, 2²)``. The choice of
a small numpy fit over `girth` / `py-irt` is measured in benchmarks/RESULTS.md (fitness estimation).

The accuracy predicted for a candidate follows tinyBenchmarks' gp-IRT and MERGE³: the examples it was
scored on count as observed, every other example counts as its IRT probability at the candidate's
ability, which is estimated from its anchor answers with a prior from the parents' abilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THETA_PRIOR_SD = 1.0
LOG_A_PRIOR_SD = 0.5
B_PRIOR_SD = 2.0
_STEP_LIMIT = 1.0  # a Fisher step is clipped, so a badly determined item cannot jump out of range


@dataclass(frozen=True)
class IrtFit:
    """Fitted item parameters (per example) and abilities (per model row of the fitted matrix)."""

    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray

    def probabilities(self, theta: float | np.ndarray) -> np.ndarray:
        """P(correct) of every example at ability ``theta`` (a row per ability when an array is given)."""
        theta = np.asarray(theta, dtype=np.float64)
        return _sigmoid(self.a * (theta[..., None] - self.b))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def fit_2pl(responses: np.ndarray, *, iterations: int = 200, tolerance: float = 1e-6) -> IrtFit:
    """Fit a 2PL model to a (models x examples) matrix of 0/1 answers; NaN marks an example not scored."""
    y = np.asarray(responses, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 1:
        raise ValueError(f"a 2PL fit needs a (models >= 2) x (examples >= 1) matrix, got shape {y.shape}")
    observed = ~np.isnan(y)
    y = np.where(observed, y, 0.0)
    mask = observed.astype(np.float64)
    # Start from the classical estimates: ability from each model's accuracy, difficulty from each item's.
    theta = _logit(_shrunk_mean(y, mask, axis=1))
    theta = (theta - theta.mean()) / (theta.std() + 1e-9)
    log_a = np.zeros(y.shape[1])
    b = -_logit(_shrunk_mean(y, mask, axis=0))
    for _ in range(iterations):
        a = np.exp(log_a)
        p = _sigmoid(a * (theta[:, None] - b))
        w = mask * p * (1 - p)
        residual = mask * (y - p)
        # Abilities, items held fixed: one Fisher-scoring step per model.
        grad_t = residual @ a - theta / THETA_PRIOR_SD**2
        info_t = w @ (a * a) + 1 / THETA_PRIOR_SD**2
        step_t = np.clip(grad_t / info_t, -_STEP_LIMIT, _STEP_LIMIT)
        theta = theta + step_t
        # Items, abilities held fixed: a 2x2 Fisher-scoring step in (log a, b) per example.
        p = _sigmoid(a * (theta[:, None] - b))
        w = mask * p * (1 - p)
        residual = mask * (y - p)
        z = a * (theta[:, None] - b)  # d logit / d log a
        grad_la = (residual * z).sum(0) - log_a / LOG_A_PRIOR_SD**2
        grad_b = -(residual.sum(0) * a) - b / B_PRIOR_SD**2
        i_aa = (w * z * z).sum(0) + 1 / LOG_A_PRIOR_SD**2
        i_bb = (w.sum(0) * a * a) + 1 / B_PRIOR_SD**2
        i_ab = -(w * z).sum(0) * a
        det = i_aa * i_bb - i_ab * i_ab
        step_la = np.clip((i_bb * grad_la - i_ab * grad_b) / det, -_STEP_LIMIT, _STEP_LIMIT)
        step_b = np.clip((i_aa * grad_b - i_ab * grad_la) / det, -_STEP_LIMIT, _STEP_LIMIT)
        log_a, b = log_a + step_la, b + step_b
        if max(np.abs(step_t).max(), np.abs(step_la).max(), np.abs(step_b).max()) < tolerance:
            break
    return IrtFit(a=np.exp(log_a), b=b, theta=theta)


def _shrunk_mean(y: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    # Add-one smoothing keeps the starting logits finite for all-right or all-wrong rows and columns.
    return (y.sum(axis) + 0.5) / (mask.sum(axis) + 1.0)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


def estimate_ability(
    fit: IrtFit, items: np.ndarray, answers: np.ndarray, *, prior_mean: float, prior_sd: float
) -> float:
    """MAP ability of a model that answered examples ``items`` with ``answers`` in [0, 1] (Newton, Gaussian
    prior): 0/1 scores, or graded ones such as answer probabilities (a Bernoulli quasi-likelihood)."""
    a, b = fit.a[items], fit.b[items]
    y = np.asarray(answers, dtype=np.float64)
    theta = prior_mean
    for _ in range(100):
        p = _sigmoid(a * (theta - b))
        grad = float(a @ (y - p)) - (theta - prior_mean) / prior_sd**2
        info = float((a * a) @ (p * (1 - p))) + 1 / prior_sd**2
        step = float(np.clip(grad / info, -_STEP_LIMIT, _STEP_LIMIT))
        theta += step
        if abs(step) < 1e-8:
            break
    return theta


def predicted_accuracy(fit: IrtFit, items: np.ndarray, answers: np.ndarray, theta: float) -> float:
    """Full-split accuracy: observed answers on ``items``, IRT probabilities at ``theta`` everywhere else."""
    probabilities = fit.probabilities(theta)
    probabilities[items] = np.asarray(answers, dtype=np.float64)
    return float(probabilities.mean())


def select_anchors(responses: np.ndarray, k: int, *, seed: int, method: str) -> np.ndarray:
    """``k`` representative example indices of a (models x examples) 0/1 matrix, sorted.

    ``stratified``: examples ordered by how many models solve them (ties in a seeded order), one drawn
    from each of ``k`` equal strata. ``clustered``: seeded k-means on the examples' answer vectors, the
    example nearest each centre (duplicates filled with seeded draws of the rest).
    """
    y = np.asarray(responses, dtype=np.float64)
    n = y.shape[1]
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if method == "stratified":
        tiebreak = rng.permutation(n)
        order = np.lexsort((tiebreak, y.mean(0)))
        strata = np.array_split(order, k)
        return np.sort([int(rng.choice(stratum)) for stratum in strata])
    if method == "clustered":
        points = y.T
        centres = _kmeans(points, k, rng)
        distances = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        chosen: list[int] = []
        for c in range(k):
            for index in np.argsort(distances[:, c], kind="stable"):
                if int(index) not in chosen:
                    chosen.append(int(index))
                    break
        return np.sort(chosen)
    raise ValueError(f"unknown anchor method {method!r}")


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; an emptied cluster keeps its centre."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        nearest = ((points[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
        total = nearest.sum()
        index = rng.choice(len(points), p=nearest / total) if total > 0 else rng.integers(len(points))
        centres.append(points[index])
    centre_array = np.array(centres, dtype=np.float64)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centre_array[None]) ** 2).sum(-1).argmin(1)
        updated = centre_array.copy()
        for c in range(k):
            members = points[labels == c]
            if len(members):
                updated[c] = members.mean(0)
        if np.allclose(updated, centre_array):
            break
        centre_array = updated
    return centre_array
