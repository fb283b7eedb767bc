"""Generalized task arithmetic: task arithmetic, TIES, DARE, Model Breadcrumbs and DELLA.

All variants share one pipeline over task vectors ``delta_i = theta_i - theta_base`` (stacked ``[N, ...]``):

1. sparsify each ``delta_i`` (magnitude trim, outlier trim, random drop, or nothing);
2. weight: ``tau_i = w_i * delta_i``;
3. consensus (TIES sign election, "sum" rule): ``s = sign(sum_i tau_i)`` with ``s = +1`` where the sum
   is 0, and keep only entries with ``sign(tau_i) == s`` (zeros never agree);
4. combine: ``tau = sum_i kept(tau_i)``; with ``normalize`` divide by ``sum_i w_i * [kept_i]``
   (elementwise, a divisor of exactly 0 becomes 1) or, without consensus, by ``sum_i w_i`` (|.| < 1e-8 -> 1);
5. ``theta = theta_base + lambda * tau``.

Defaults of ``normalize`` and ``rescale`` per method follow mergekit 0.1.5. The kernels take their
parameters as ``**params`` because the mergekit name ``lambda`` is a Python keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from evomerge.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

# Imported when a kernel first runs: registering the operators must not cost a torch import.
torch = lazy_module("torch")

from evomerge.merge.ops.reduce import weighted_sum
from evomerge.merge.ops.sparsify import drop_della, drop_random, trim_magnitude, trim_outliers, work_dtype
from evomerge.merge.registry import ParamSpec, check_params, operator

# mergekit's guard for the non-consensus divisor sum_i w_i.
_DIVISOR_EPS = 1e-8

WEIGHT = ParamSpec("weight", None, per_model=True, search=(0.0, 1.0), doc="Scale of each task vector.")
DENSITY = ParamSpec("density", 1.0, per_model=True, low=0.0, high=1.0, doc="Fraction of entries kept.")
LAMBDA = ParamSpec("lambda", 1.0, search=(0.0, 2.0), doc="Scale of the merged task vector.")
GAMMA = ParamSpec(
    "gamma", 0.01, per_model=True, low=0.0, high=1.0, doc="Fraction of largest entries dropped."
)
EPSILON = ParamSpec(
    "epsilon", 0.15, per_model=True, low=0.0, high=1.0, doc="Half-width of DELLA's keep-probability ramp."
)


def _flags(normalize: bool, rescale: bool) -> tuple[ParamSpec, ParamSpec]:
    return (
        ParamSpec("normalize", normalize, doc="Divide by the (kept) weight sum."),
        ParamSpec("rescale", rescale, doc="Compensate the mass removed by sparsification."),
    )


def generalized_task_arithmetic(
    base: Tensor,
    deltas: Tensor,
    weight: list[float],
    *,
    sparsify: Callable[[Tensor], Tensor] | None,
    consensus: bool,
    normalize: bool,
    scale: float,
) -> Tensor:
    """The shared pipeline (module docstring); `sparsify` maps ``deltas`` to a fresh tensor it owns."""
    n = deltas.shape[0]
    if n == 0:
        return base.clone()
    dtype = work_dtype(deltas)
    if sparsify is not None:
        rows = sparsify(deltas).reshape(n, -1)  # fresh: ours to modify in place
    elif consensus:
        rows = deltas.reshape(n, -1).to(dtype, copy=True)
    else:
        rows = deltas.reshape(n, -1).to(dtype)  # read only below; no copy unless a cast is needed
    dtype = rows.dtype
    if not consensus:
        total = sum(weight) if normalize else 1.0
        coefficients = [scale * w / (1.0 if abs(total) < _DIVISOR_EPS else total) for w in weight]
        # theta_base + sum_i c_i delta_i in one pass per model, no [N, ...] temporary.
        merged = weighted_sum(rows, coefficients, dtype=dtype, start=base.reshape(-1))
        return merged.view(base.shape).to(base.dtype)
    w = torch.tensor(weight, dtype=dtype, device=rows.device)
    rows.mul_(w[:, None])  # tau_i
    majority = rows.sum(dim=0).ge_(0).to(dtype).mul_(2).sub_(1)
    # tau_i * s > 0 exactly where sign(tau_i) == s; clamping leaves |kept tau_i|, so no bool mask.
    rows.mul_(majority).clamp_(min=0)
    mixed = rows.sum(dim=0).mul_(majority)
    if normalize:
        divisor = weighted_sum(rows.sign_(), weight, dtype=dtype)  # sum of the weights of the models that agree
        # A divisor of 0 becomes 1: add the float indicator (written into the spent `rows`) rather than
        # `masked_fill_` with a boolean mask, 5x slower on CPU.
        mixed /= divisor.add_(torch.eq(divisor, 0, out=rows[0]))
    if scale != 1:
        mixed *= scale
    # mixed + base == base + mixed exactly; adding into our own `mixed` saves a fresh tensor and a pass.
    return mixed.view(base.shape).add_(base).to(base.dtype)


def _run(
    name: str,
    specs: tuple[ParamSpec, ...],
    base: Tensor,
    deltas: Tensor,
    params: dict[str, Any],
    *,
    consensus: bool,
    sparsify: Callable[[Tensor, dict[str, Any]], Tensor] | None,
) -> Tensor:
    p = check_params(name, specs, params, num_models=deltas.shape[0])
    return generalized_task_arithmetic(
        base,
        deltas,
        p["weight"],
        sparsify=None if sparsify is None else (lambda d: sparsify(d, p)),
        consensus=consensus,
        normalize=p["normalize"],
        scale=p["lambda"],
    )


TASK_ARITHMETIC_PARAMS = (WEIGHT, *_flags(False, False), LAMBDA)


@operator("task_arithmetic", space="delta", params=TASK_ARITHMETIC_PARAMS)
def task_arithmetic(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """Task arithmetic: ``theta = theta_base + lambda * sum_i w_i delta_i`` (/ ``sum_i w_i`` if normalize).

    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
    ``rescale`` has no effect (nothing is sparsified); it is accepted for mergekit compatibility.
    """
    return _run(
        "task_arithmetic", TASK_ARITHMETIC_PARAMS, base, deltas, params, consensus=False, sparsify=None
    )


TIES_PARAMS = (WEIGHT, DENSITY, *_flags(True, False), LAMBDA)


@operator("ties", space="delta", params=TIES_PARAMS)
def ties(base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any) -> Tensor:
    """TIES-Merging: trim each delta to its top-``density`` magnitudes, elect signs, disjoint mean.

    ``theta = theta_base + lambda * sum_i w_i trim(delta_i)[agree] / sum_i w_i [agree]``.
    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023 (arXiv:2306.01708).
    """
    return _run(
        "ties", TIES_PARAMS, base, deltas, params, consensus=True,
        sparsify=lambda d, p: trim_magnitude(d, p["density"], rescale=p["rescale"]),
    )  # fmt: skip


def _dare(d: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> Tensor:
    return drop_random(d, p["density"], rescale=p["rescale"], generator=generator)


DARE_PARAMS = (WEIGHT, DENSITY, *_flags(False, True), LAMBDA)


@operator("dare_linear", space="delta", params=DARE_PARAMS, is_random=True)
def dare_linear(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """DARE + task arithmetic: ``theta = theta_base + lambda * sum_i w_i (m_i * delta_i) / density_i``.

    ``m_i ~ Bernoulli(density_i)`` elementwise. Yu et al., "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch", ICML 2024 (arXiv:2311.03099).
    """
    return _run(
        "dare_linear", DARE_PARAMS, base, deltas, params, consensus=False,
        sparsify=lambda d, p: _dare(d, p, generator),
    )  # fmt: skip


@operator("dare_ties", space="delta", params=DARE_PARAMS, is_random=True)
def dare_ties(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """DARE drop-and-rescale followed by TIES sign election and disjoint mean (the Sakana PS operator).

    Yu et al., arXiv:2311.03099; sign election from Yadav et al., arXiv:2306.01708.
    """
    return _run(
        "dare_ties", DARE_PARAMS, base, deltas, params, consensus=True,
        sparsify=lambda d, p: _dare(d, p, generator),
    )  # fmt: skip


BREADCRUMBS_PARAMS = (WEIGHT, DENSITY, GAMMA, *_flags(False, False), LAMBDA)


def _breadcrumbs(d: Tensor, p: dict[str, Any]) -> Tensor:
    return trim_outliers(d, p["density"], p["gamma"], rescale=p["rescale"])


@operator("breadcrumbs", space="delta", params=BREADCRUMBS_PARAMS)
def breadcrumbs(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """Model Breadcrumbs: drop the top-``gamma`` outliers and the smallest entries, then add.

    ``theta = theta_base + lambda * sum_i w_i mask_i * delta_i``. Davari & Belilovsky, "Model
    Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024 (arXiv:2312.06795).
    """
    return _run(
        "breadcrumbs", BREADCRUMBS_PARAMS, base, deltas, params, consensus=False, sparsify=_breadcrumbs
    )


@operator("breadcrumbs_ties", space="delta", params=BREADCRUMBS_PARAMS)
def breadcrumbs_ties(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """Model Breadcrumbs masks followed by TIES sign election (arXiv:2312.06795, arXiv:2306.01708)."""
    return _run(
        "breadcrumbs_ties", BREADCRUMBS_PARAMS, base, deltas, params, consensus=True, sparsify=_breadcrumbs
    )


def _della(d: Tensor, p: dict[str, Any], generator: torch.Generator | None) -> Tensor:
    return drop_della(d, p["density"], p["epsilon"], rescale=p["rescale"], generator=generator)


DELLA_PARAMS = (WEIGHT, DENSITY, EPSILON, *_flags(True, True), LAMBDA)
DELLA_LINEAR_PARAMS = (WEIGHT, DENSITY, EPSILON, *_flags(False, True), LAMBDA)


@operator("della", space="delta", params=DELLA_PARAMS, is_random=True)
def della(base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any) -> Tensor:
    """DELLA: magnitude-ranked random drop (MAGPRUNE), TIES sign election, disjoint mean.

    Keep probability per entry ``density - epsilon + 2 * epsilon * rank / (cols - 1)`` within its row.
    Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
    Sampling" (arXiv:2406.11617).
    """
    return _run(
        "della", DELLA_PARAMS, base, deltas, params, consensus=True,
        sparsify=lambda d, p: _della(d, p, generator),
    )  # fmt: skip


@operator("della_linear", space="delta", params=DELLA_LINEAR_PARAMS, is_random=True)
def della_linear(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, **params: Any
) -> Tensor:
    """DELLA's MAGPRUNE drop followed by a plain weighted sum, no sign election (arXiv:2406.11617)."""
    return _run(
        "della_linear", DELLA_LINEAR_PARAMS, base, deltas, params, consensus=False,
        sparsify=lambda d, p: _della(d, p, generator),
    )  # fmt: skip
