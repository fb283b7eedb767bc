"""Sparsifiers for stacked task vectors ``[N, *shape]``: magnitude trim, outlier-aware trim, DARE, DELLA.

Every function returns a **fresh** tensor (in the working dtype) that the caller may modify in place,
and never touches its input. Per-model settings are lists of length N. Thresholds come from
``kthvalue`` order statistics, never from a full sort (mergekit 0.1.5 uses ``argsort``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from evomerge.lazy import lazy_module

if TYPE_CHECKING:
    from torch import Tensor

# Imported when a kernel first runs: registering the operators must not cost a torch import.
torch = lazy_module("torch")

from evomerge.errors import ConfigError

# mergekit's guard in its norm-matching rescale: below this an L1 norm counts as zero.
RESCALE_EPS = 1e-7


def work_dtype(tensor: Tensor) -> torch.dtype:
    """float32 for half-precision CPU tensors (CPU half kernels are slow or missing), else the input dtype."""
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return tensor.dtype


def _rows(x: Tensor) -> Tensor:
    """View ``[N, *shape]`` as ``[N, numel]``."""
    return x.reshape(x.shape[0], -1)


def _fresh_abs(flat: Tensor) -> Tensor:
    dtype = work_dtype(flat)
    return flat.abs() if dtype == flat.dtype else flat.to(dtype).abs_()


def _order_statistics(mag: Tensor, ranks: Sequence[int], *, source: Tensor | None = None) -> Tensor:
    """Per row r, the ``ranks[r]``-th smallest value of ``mag[r]`` (1-based) as ``[N, 1]``.

    A rank of ``numel + 1`` yields ``+inf`` ("nothing is at least this large"). `source`, if given, is
    the ``[N, numel]`` tensor with ``mag = |source|``; when it is half precision its order statistics are
    counted exactly from bit patterns (`_half_magnitude_kth`) instead of selected with ``kthvalue``.
    """
    n, m = mag.shape
    out = torch.full((n, 1), torch.inf, dtype=mag.dtype, device=mag.device)
    valid = [r for r, k in enumerate(ranks) if k <= m]
    if not valid:
        return out
    if source is not None and source.dtype in (torch.float16, torch.bfloat16):
        for r in valid:
            out[r] = _half_magnitude_kth(source[r], ranks[r])
        return out
    if len(set(ranks)) == 1:  # common case (one density for every model): one batched call
        return torch.kthvalue(mag, ranks[0], dim=1, keepdim=True).values
    for r in valid:
        out[r] = torch.kthvalue(mag[r], ranks[r]).values
    return out


# A half-precision number has 2^16 bit patterns; clearing the sign bit leaves a 15-bit integer that orders
# the magnitudes exactly as the floats do (IEEE layout: exponent above mantissa; NaN patterns sort last).
_MAGNITUDE_PATTERNS = 1 << 15


def _half_magnitude_kth(row: Tensor, rank: int) -> Tensor:
    """The ``rank``-th smallest ``|x|`` of a 1-D half-precision tensor, exactly, by counting.

    A histogram of the 32768 magnitude patterns and its running sum locate the k-th value in two passes
    over 2 bytes per entry, where ``kthvalue`` copied the 4-byte float32 magnitudes and partitioned them
    (CPU, one row of 11.5M entries: 14 ms vs 172 ms; benchmarks/RESULTS.md).
    """
    patterns = row.view(torch.int16) & (_MAGNITUDE_PATTERNS - 1)
    counts = torch.bincount(patterns, minlength=_MAGNITUDE_PATTERNS)
    # the first pattern with at least `rank` entries at or below it
    pattern = torch.searchsorted(counts.cumsum_(0), rank)
    return pattern.to(torch.int16).view(row.dtype).to(work_dtype(row))


def _at_least_(x: Tensor, threshold: Tensor) -> Tensor:
    """In place: 1 where ``x >= threshold`` else 0, without allocating a boolean mask.

    ``ge_`` on a float tensor stores the comparison as 1.0 / 0.0 in its own dtype (CPU, 23M float32
    entries: 7 ms, where the earlier ``sub_(t).heaviside_(1)`` took 100 ms for the same indicator).
    """
    return x.ge_(threshold)


def magnitude_keep_count(density: float, numel: int) -> int:
    """Entries kept by magnitude trimming (mergekit: at least one for a positive density)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def l1_rescale_(sparse: Tensor, dense: Tensor) -> Tensor:
    """In place: scale each model's sparsified vector so its L1 norm equals the dense one's.

    This is mergekit 0.1.5's ``rescale`` for magnitude-based and DELLA sparsification; it is skipped
    for a model whose norm (before or after) is below ``RESCALE_EPS``.
    """
    dtype = sparse.dtype
    before = torch.linalg.vector_norm(_rows(dense), ord=1, dim=1, dtype=dtype)
    after = torch.linalg.vector_norm(_rows(sparse), ord=1, dim=1)
    tiny = (before < RESCALE_EPS) | (after < RESCALE_EPS)
    scale = torch.where(tiny, torch.ones_like(before), before / after.clamp_min(RESCALE_EPS))
    _rows(sparse).mul_(scale[:, None])
    return sparse


def trim_magnitude(deltas: Tensor, density: Sequence[float], *, rescale: bool = False) -> Tensor:
    """TIES trimming: keep the ``k = max(1, int(density * numel))`` largest-magnitude entries per model.

    The threshold is the k-th largest magnitude; with tied magnitudes at the threshold all ties are
    kept. ``rescale`` matches the L1 norm of the dense task vector (mergekit 0.1.5).
    """
    flat = _rows(deltas)
    numel = flat.shape[1]
    keep_counts = [magnitude_keep_count(d, numel) for d in density]
    mag = _fresh_abs(flat)
    threshold = _order_statistics(mag, [numel - k + 1 for k in keep_counts], source=flat)
    trimmed = _at_least_(mag, threshold).mul_(flat).view(deltas.shape)
    return l1_rescale_(trimmed, deltas) if rescale else trimmed


def trim_outliers(
    deltas: Tensor, density: Sequence[float], gamma: Sequence[float], *, rescale: bool = False
) -> Tensor:
    """Model Breadcrumbs trimming: drop the top ``gamma`` fraction and the smallest entries.

    With ``n = numel``: keep ``int(density * n)`` entries whose ascending magnitude ranks are
    ``[n_bot, n_bot + int(density * n))`` with ``n_bot = max(0, n - int(density * n) - int(gamma * n))``,
    i.e. outlier removal shrinks when needed to keep the target density (mergekit 0.1.5).
    A density of 1 keeps everything, whatever gamma.
    """
    flat = _rows(deltas)
    numel = flat.shape[1]
    low_ranks, high_ranks = [], []
    for d, g in zip(density, gamma, strict=True):
        target = numel if d >= 1 else int(d * numel)
        bottom = 0 if d >= 1 else max(0, numel - target - int(g * numel))
        # rank numel + 1 -> +inf lower bound: nothing kept when the target is zero
        low_ranks.append(bottom + 1 if target > 0 else numel + 1)
        high_ranks.append(max(1, bottom + target))
    mag = _fresh_abs(flat)
    low = _order_statistics(mag, low_ranks, source=flat)
    high = _order_statistics(mag, high_ranks, source=flat)
    keep = _at_least_(mag.clone(), low)
    keep.mul_(_at_least_(mag.neg_(), -high))  # -|x| >= -high  <=>  |x| <= high
    trimmed = keep.mul_(flat).view(deltas.shape)
    return l1_rescale_(trimmed, deltas) if rescale else trimmed


def bernoulli_mask(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """A fresh 0/1 tensor like `probs` (floating), 1 with probability `probs`: ``u < p``, u ~ U[0, 1).

    Thresholding `uniform_` rather than calling `bernoulli_`: on CPU it draws the very same masks from the
    same generator state (`bernoulli_` compares one uniform per entry too, serially), 3.3x faster (268 vs
    81 million draws/s on 2 threads; a DARE-TIES merge of 3 x 271M parameters spent 9.3 s of its 15 s in
    `bernoulli_`, benchmarks/RESULTS.md), so recipes evolved before keep their weights.
    """
    return torch.empty_like(probs, memory_format=torch.contiguous_format).uniform_(generator=generator).lt_(probs)


def drop_random(
    deltas: Tensor, density: Sequence[float], *, rescale: bool, generator: torch.Generator | None
) -> Tensor:
    """DARE: keep each entry independently with probability ``density``; rescale survivors by 1/density.

    The 1/density factor (Yu et al.) keeps the task vector unbiased: E[out] = delta. mergekit 0.1.5
    instead matches the L1 norm per tensor, a factor whose expectation is the same up to O(1/sqrt(numel)).
    """
    flat = _rows(deltas)
    n, numel = flat.shape
    dtype = work_dtype(flat)
    probs = torch.tensor(density, dtype=dtype, device=flat.device).clamp_(0, 1)[:, None]
    keep = bernoulli_mask(probs.expand(n, numel), generator)
    if rescale:
        # density 0 keeps nothing; the 0 factor avoids 0 * inf = nan
        keep.mul_(torch.where(probs > 0, probs.reciprocal(), torch.zeros_like(probs)))
    return keep.mul_(flat).view(deltas.shape)


def drop_della(
    deltas: Tensor,
    density: Sequence[float],
    epsilon: Sequence[float],
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """DELLA MAGPRUNE: drop with a keep probability that rises linearly with magnitude rank.

    Within each row (dim 0 of a matrix; a vector is one row) the entry of normalised ascending rank
    ``r`` in [0, 1] is kept with probability ``density - epsilon + 2 * epsilon * r``. ``rescale``
    matches the L1 norm of the dense task vector (mergekit 0.1.5). Densities >= 1 keep everything.
    """
    n = deltas.shape[0]
    rows = deltas.reshape(n, deltas.shape[1] if deltas.dim() > 2 else 1, -1)
    cols = rows.shape[-1]
    low, width = [], []
    for d, e in zip(density, epsilon, strict=True):
        if d >= 1 or d <= 0:
            low.append(1.0 if d >= 1 else 0.0)
            width.append(0.0)
            continue
        if d - e <= 0 or d + e >= 1:
            raise ConfigError(
                f"DELLA needs 0 < density - epsilon and density + epsilon < 1; got {d} and {e}."
            )
        low.append(d - e)
        width.append(2 * e)
    dtype = work_dtype(rows)
    mag = _fresh_abs(rows)
    order = mag.argsort(dim=-1)
    # inverse permutation of the sort = ascending rank, without a second sort
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(cols, device=rows.device).expand_as(order)
    )
    del order
    probs = mag.copy_(rank).div_(max(cols - 1, 1)) if cols > 1 else mag.fill_(0.5)
    del rank
    as_col = {"dtype": dtype, "device": rows.device}
    probs.mul_(torch.tensor(width, **as_col)[:, None, None]).add_(torch.tensor(low, **as_col)[:, None, None])
    kept = bernoulli_mask(probs, generator).mul_(rows).view(deltas.shape)
    return l1_rescale_(kept, deltas) if rescale else kept
