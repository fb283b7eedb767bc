"""Weight-space interpolation: linear averaging, SLERP and passthrough."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

# Imported when a kernel first runs: registering the operators must not cost a torch import.
torch = lazy_module("torch")

from evomerge.errors import ConfigError
from evomerge.merge.ops.reduce import weighted_sum
from evomerge.merge.registry import ParamSpec, operator

# mergekit 0.1.5 SLERP constants: above this |cos| the pair counts as colinear and is lerped;
# norms at or below eps are replaced by 1 so zero tensors do not divide by zero.
DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8


def accumulate_dtype(tensor: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (mergekit's interpolation precision)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@operator(
    "linear",
    space="weights",
    needs_base=False,
    params=(
        ParamSpec("weight", None, per_model=True, search=(0.0, 1.0), doc="Coefficient of each model."),
        ParamSpec("normalize", True, doc="Divide by the sum of the weights."),
    ),
)
def linear(
    tensors: Tensor,
    base: Tensor | None,
    *,
    generator: torch.Generator | None = None,
    weight: list[float],
    normalize: bool = True,
) -> Tensor:
    """Weighted average: ``theta = sum_i w_i theta_i`` (divided by ``sum_i w_i`` if normalize).

    Wortsman et al., "Model soups", ICML 2022 (arXiv:2203.05482). `base` is ignored, as in mergekit;
    list the base among `tensors` to give it a weight. Accumulates in float32 (float64 for float64).
    """
    total = sum(weight) if normalize else 1.0
    if total == 0:
        raise ConfigError("Linear merge with normalize needs weights whose sum is not zero.")
    merged = weighted_sum(tensors, [w / total for w in weight], dtype=accumulate_dtype(tensors))
    return merged.to(tensors.dtype)


@operator(
    "slerp",
    space="weights",
    single_input=True,
    params=(
        ParamSpec("t", None, low=0.0, high=1.0, doc="Position from the base (0) to the other model (1)."),
    ),
)
def slerp(
    tensors: Tensor, base: Tensor | None, *, generator: torch.Generator | None = None, t: float
) -> Tensor:
    """Spherical linear interpolation from ``v0 = base`` to ``v1 = tensors[0]`` over the whole tensor.

    ``cos(theta) = <v0, v1> / (|v0| |v1|)``; ``out = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1``,
    falling back to ``(1-t) v0 + t v1`` when ``|cos(theta)| > 0.9995``. The unnormalised tensors are
    interpolated (norms only set the angle). Shoemake, "Animating rotation with quaternion curves",
    SIGGRAPH 1985; applied to LLM weights by mergekit (Goddard et al., arXiv:2403.13257).
    """
    if base is None or tensors.shape[0] != 1:
        raise ConfigError("SLERP merges exactly one model into a base model.")
    dtype = accumulate_dtype(base)
    v0 = base.reshape(-1).to(dtype)
    v1 = tensors[0].reshape(-1).to(dtype)
    norm0, norm1 = torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)
    norm0 = torch.where(norm0 > SLERP_EPS, norm0, 1)
    norm1 = torch.where(norm1 > SLERP_EPS, norm1, 1)
    # Dividing the dot product (not each vector) by the norms saves two full-size temporaries; it
    # cannot overflow in float32 for any realistic weight tensor.
    cos = (torch.dot(v0, v1) / (norm0 * norm1)).clamp(-1, 1)
    colinear = cos.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return (c0 * v0 + c1 * v1).view(base.shape).to(base.dtype)


@operator(
    "passthrough",
    space="weights",
    needs_base=False,
    single_input=True,
    params=(ParamSpec("scale", 1.0, per_model=True, doc="Factor applied to the tensor (mergekit `scale`)."),),
)
def passthrough(
    tensors: Tensor,
    base: Tensor | None,
    *,
    generator: torch.Generator | None = None,
    scale: list[float] | None = None,
) -> Tensor:
    """Copy the single input tensor, optionally scaled: ``theta = scale * theta_1``.

    Used for layer stacking ("frankenmerges"); the planner decides which layer goes where. The result
    may share storage with the input when ``scale`` is 1.
    """
    if tensors.shape[0] != 1:
        raise ConfigError(f"Passthrough takes exactly one model per tensor, got {tensors.shape[0]}.")
    factor = 1.0 if scale is None else scale[0]
    return tensors[0] if factor == 1 else tensors[0] * factor
