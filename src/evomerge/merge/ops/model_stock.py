"""Model Stock: interpolate toward the mean of the fine-tunes by an angle-derived ratio."""

from __future__ import annotations

from typing import TYPE_CHECKING

from evomerge.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

# Imported when a kernel first runs: registering the operators must not cost a torch import.
torch = lazy_module("torch")

from evomerge.errors import ConfigError
from evomerge.merge.ops.sparsify import work_dtype
from evomerge.merge.registry import ParamSpec, operator

# mergekit 0.1.5 guards: minimum norm product in the cosine, and the |1 + (N-1) cos| below which
# there is no finite ratio (the base is kept).
NORM_EPS = 1e-6
SINGULAR_EPS = 1e-6


@operator(
    "model_stock",
    space="delta",
    params=(ParamSpec("filter_wise", False, doc="One ratio per output row instead of per tensor."),),
)
def model_stock(
    base: Tensor, deltas: Tensor, *, generator: torch.Generator | None = None, filter_wise: bool = False
) -> Tensor:
    """``theta = theta_base + t * mean_i delta_i`` with ``t = N cos / (1 + (N - 1) cos)``.

    ``cos`` is the mean pairwise cosine between the task vectors (per tensor, or per row with
    ``filter_wise``); where ``|1 + (N-1) cos| < 1e-6`` the base is kept (t = 0). Orthogonal deltas give
    t = 0, parallel ones t = 1. Jang et al., "Model Stock: All we need is just a few fine-tuned
    models", ECCV 2024 (arXiv:2403.19522).
    """
    n = deltas.shape[0]
    if n < 2:
        raise ConfigError(f"Model Stock needs at least two models besides the base, got {n}.")
    dtype = work_dtype(deltas)
    rows_per_model = deltas.shape[1] if filter_wise and deltas.dim() > 2 else 1
    d = deltas.reshape(n, rows_per_model, -1).to(dtype)
    gram = torch.einsum("irc,jrc->rij", d, d)  # [rows, N, N]: tiny, no [N, ...] temporary
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()  # [rows, N]
    i, j = torch.triu_indices(n, n, offset=1, device=d.device)
    cos = (gram[:, i, j] / (norms[:, i] * norms[:, j]).clamp_min(NORM_EPS)).clamp(-1, 1).mean(dim=1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1, denominator))
    mean = d.mean(dim=0)  # [rows, cols]
    merged = base.reshape(rows_per_model, -1).to(dtype) + t[:, None] * mean
    return merged.view(base.shape).to(base.dtype)
