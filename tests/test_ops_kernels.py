"""Every operator on hand-made tensors, against expectations worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.registry import get_operator


def merge(name: str, base: torch.Tensor | None, models: list | torch.Tensor, seed: int = 0, **params):
    """Run operator `name` the way the planner does: deltas for delta-space ops, weights otherwise."""
    spec = get_operator(name)
    stacked = (
        torch.stack(models)
        if isinstance(models, list) and torch.is_tensor(models[0])
        else torch.as_tensor(models)
    )
    generator = torch.Generator().manual_seed(seed)
    if spec.space == "delta":
        return spec.kernel(base, stacked - base, generator=generator, **params)
    return spec.kernel(stacked, base, generator=generator, **params)


BASE = torch.ones(4)
# task vectors d1 = [3, -1, 2, 0.5], d2 = [-2, -4, 1, 0.1]
TIES_MODELS = [[4.0, 0.0, 3.0, 1.5], [-1.0, -3.0, 2.0, 1.1]]


def test_task_arithmetic() -> None:
    base = torch.tensor([1.0, 2.0])
    models = [[2.0, 2.0], [1.0, 4.0]]  # deltas [1, 0] and [0, 2]
    # 0.5 * [1, 0] + 2 * [0, 2] = [0.5, 4]
    torch.testing.assert_close(
        merge("task_arithmetic", base, models, weight=[0.5, 2.0]), torch.tensor([1.5, 6.0])
    )
    # normalised by 2.5 -> [0.2, 1.6]; lambda 2 -> [0.4, 3.2]
    out = merge("task_arithmetic", base, models, weight=[0.5, 2.0], normalize=True, **{"lambda": 2.0})
    torch.testing.assert_close(out, torch.tensor([1.4, 5.2]))


def test_ties_trim_elect_disjoint_mean() -> None:
    # density 0.5 keeps k = 2 per model: [3, 0, 2, 0] and [-2, -4, 0, 0].
    # weights [1, 3]: tau = [3, 0, 2, 0], [-6, -12, 0, 0]; sums [-3, -12, 2, 0] -> signs [-, -, +, +].
    # agreeing: pos0 tau2 (-6 / w 3), pos1 tau2 (-12 / 3), pos2 tau1 (2 / 1), pos3 nobody (0, divisor 0 -> 1).
    out = merge("ties", BASE, TIES_MODELS, weight=[1.0, 3.0], density=0.5)
    torch.testing.assert_close(out, BASE + torch.tensor([-2.0, -4.0, 2.0, 0.0]))
    unnormalized = merge("ties", BASE, TIES_MODELS, weight=[1.0, 3.0], density=0.5, normalize=False)
    torch.testing.assert_close(unnormalized, BASE + torch.tensor([-6.0, -12.0, 2.0, 0.0]))
    scaled = merge("ties", BASE, TIES_MODELS, weight=[1.0, 3.0], density=0.5, **{"lambda": 0.5})
    torch.testing.assert_close(scaled, BASE + torch.tensor([-1.0, -2.0, 1.0, 0.0]))


def test_ties_per_model_density_and_l1_rescale() -> None:
    # density [0.25, 0.75]: k = 1 -> [3, 0, 0, 0]; k = 3 -> [-2, -4, 1, 0]
    # rescale matches L1 norms: 6.5 / 3 for model 1, 7.1 / 7 for model 2.
    s1, s2 = 6.5 / 3, 7.1 / 7
    out = merge(
        "ties", BASE, TIES_MODELS, weight=[1.0, 1.0], density=[0.25, 0.75], rescale=True, normalize=False
    )
    # sums [3 s1 - 2 s2, -4 s2, s2, 0] -> signs [+, -, +, +]
    torch.testing.assert_close(out, BASE + torch.tensor([3 * s1, -4 * s2, s2, 0.0]))


def test_breadcrumbs_drops_outliers_and_small_entries() -> None:
    base = torch.zeros(10)
    delta = torch.tensor([1.0, -2, 3, -4, 5, -6, 7, -8, 9, -10])
    # n = 10, density 0.5 -> 5 kept, gamma 0.1 -> top 1 dropped, bottom 10 - 5 - 1 = 4 dropped
    expected = torch.tensor([0.0, 0, 0, 0, 5, -6, 7, -8, 9, 0])
    torch.testing.assert_close(
        merge("breadcrumbs", base, [delta], weight=[1.0], density=0.5, gamma=0.1), expected
    )
    # density 0.9, gamma 0.2: 9 kept; outlier removal shrinks to 1 so the target density holds
    expected = delta.clone()
    expected[-1] = 0
    torch.testing.assert_close(
        merge("breadcrumbs", base, [delta], weight=[1.0], density=0.9, gamma=0.2), expected
    )


def test_breadcrumbs_ties_elects_signs_after_masking() -> None:
    base = torch.zeros(5)
    # density 0.6 -> 3 kept, gamma 0.2 -> the largest dropped, bottom 1 dropped
    d1 = [1.0, 2.0, 3.0, 4.0, 5.0]  # -> [0, 2, 3, 4, 0]
    d2 = [-5.0, -4.0, -1.0, -3.0, -2.0]  # -> [0, -4, 0, -3, -2]
    # sums [0, -2, 3, 1, -2] -> signs [+, -, +, +, -]; no normalisation by default
    out = merge("breadcrumbs_ties", base, [d1, d2], weight=[1.0, 1.0], density=0.6, gamma=0.2)
    torch.testing.assert_close(out, torch.tensor([0.0, -4.0, 3.0, 4.0, -2.0]))


def test_dare_linear_keeps_or_drops_and_rescales_by_inverse_density() -> None:
    base = torch.zeros(1000)
    delta = torch.linspace(1, 2, 1000)
    out = merge("dare_linear", base, [delta], weight=[1.0], density=0.25)
    kept = out != 0
    torch.testing.assert_close(out[kept], delta[kept] / 0.25)
    assert 0.2 < kept.float().mean().item() < 0.3
    plain = merge("dare_linear", base, [delta], weight=[1.0], density=0.25, rescale=False)
    torch.testing.assert_close(plain[plain != 0], delta[plain != 0])


def test_random_ops_draw_only_from_the_generator() -> None:
    base = torch.zeros(64, 8)
    models = torch.randn(2, 64, 8)
    for name in ("dare_ties", "dare_linear", "della", "della_linear"):
        params = {"weight": [0.5, 0.5], "density": 0.5}
        torch.manual_seed(1)
        first = merge(name, base, models, seed=7, **params)
        torch.manual_seed(2)
        torch.testing.assert_close(merge(name, base, models, seed=7, **params), first, rtol=0, atol=0)
        assert not torch.equal(merge(name, base, models, seed=8, **params), first)


def test_dare_density_zero_keeps_the_base() -> None:
    out = merge("dare_ties", torch.ones(6), [[5.0] * 6], weight=[1.0], density=0.0)
    torch.testing.assert_close(out, torch.ones(6))


def test_della_keep_probability_ramps_with_magnitude_rank() -> None:
    # 4000 identical rows with magnitudes 1..11: column j (rank j) kept with p = 0.5 - 0.2 + 0.4 j / 10
    rows, cols = 4000, 11
    delta = torch.arange(1, cols + 1, dtype=torch.float32).repeat(rows, 1)
    out = merge(
        "della_linear",
        torch.zeros(rows, cols),
        delta[None],
        weight=[1.0],
        density=0.5,
        epsilon=0.2,
        rescale=False,
    )
    rate = (out != 0).float().mean(dim=0)
    expected = 0.3 + 0.04 * torch.arange(cols)
    # binomial std <= 0.008; 5 sigma
    torch.testing.assert_close(rate, expected, atol=0.04, rtol=0)
    torch.testing.assert_close(out[out != 0], delta[out != 0])


def test_della_rejects_epsilon_beyond_density() -> None:
    with pytest.raises(ConfigError, match="density - epsilon"):
        merge("della", torch.zeros(4, 4), torch.randn(1, 4, 4), weight=[1.0], density=0.1, epsilon=0.15)


def test_model_stock_ratio_from_the_angle() -> None:
    base = torch.zeros(2)
    # cos 0.5 between [1, 0] and [0.5, sqrt(3)/2]: t = 2 * 0.5 / (1 + 0.5) = 2/3
    d2 = [0.5, math.sqrt(3) / 2]
    out = merge("model_stock", base, [[1.0, 0.0], d2])
    torch.testing.assert_close(out, (2 / 3) * torch.tensor([0.75, math.sqrt(3) / 4]))


def test_model_stock_filter_wise_and_singular_rows() -> None:
    base = torch.ones(3, 2)
    d1 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    d2 = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, -2.0]])
    # row 0 orthogonal -> t 0; row 1 parallel -> t 1 (mean [1.5, 1.5]); row 2 opposite -> singular, t 0
    out = merge("model_stock", base, torch.stack([base + d1, base + d2]), filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0], [2.5, 2.5], [1.0, 1.0]]))
    # per tensor: cos = (0 + 4 - 5) / (sqrt(8) sqrt(14)) = -1 / sqrt(112); t = 2 cos / (1 + cos)
    cos = -1 / math.sqrt(112)
    t = 2 * cos / (1 + cos)
    out = merge("model_stock", base, torch.stack([base + d1, base + d2]))
    torch.testing.assert_close(out, base + t * (d1 + d2) / 2)


def test_linear() -> None:
    models = [[1.0, 2.0], [3.0, 4.0]]
    # (1 * [1, 2] + 3 * [3, 4]) / 4
    torch.testing.assert_close(merge("linear", None, models, weight=[1.0, 3.0]), torch.tensor([2.5, 3.5]))
    torch.testing.assert_close(
        merge("linear", None, models, weight=[1.0, 3.0], normalize=False), torch.tensor([10.0, 14.0])
    )
    with pytest.raises(ConfigError, match="sum is not zero"):
        merge("linear", None, models, weight=[1.0, -1.0])


def test_slerp() -> None:
    r = math.sqrt(0.5)  # sin(pi/4) / sin(pi/2)
    base = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(merge("slerp", base, [[0.0, 1.0]], t=0.5), torch.tensor([r, r]))
    # unnormalised tensors: the angle is still pi/2, the coefficients apply to [0, 2]
    torch.testing.assert_close(merge("slerp", base, [[0.0, 2.0]], t=0.5), torch.tensor([r, 2 * r]))
    # t = 1/3 of a right angle: [cos(pi/6), sin(pi/6)]
    torch.testing.assert_close(
        merge("slerp", base, [[0.0, 1.0]], t=1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5])
    )
    # colinear pair -> plain lerp
    out = merge("slerp", torch.tensor([1.0, 1.0]), [[2.0, 2.0]], t=0.25)
    torch.testing.assert_close(out, torch.tensor([1.25, 1.25]))
    with pytest.raises(ConfigError, match="exactly one model"):
        merge("slerp", base, [[0.0, 1.0], [1.0, 1.0]], t=0.5)


def test_passthrough() -> None:
    x = torch.tensor([[1.0, -2.0]])
    torch.testing.assert_close(merge("passthrough", None, x), x[0])
    torch.testing.assert_close(merge("passthrough", None, x, scale=[0.5]), torch.tensor([0.5, -1.0]))
    with pytest.raises(ConfigError, match="exactly one model"):
        merge("passthrough", None, torch.ones(2, 3))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs_ties", "model_stock"])
def test_half_precision_on_cpu_matches_float32(name: str) -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(32, 16, generator=generator)
    deltas = 0.1 * torch.randn(3, 32, 16, generator=generator)
    params = {} if name == "model_stock" else {"weight": [0.3, 0.5, 0.2], "density": 0.5}
    if name == "task_arithmetic":
        params.pop("density")
    spec = get_operator(name)
    full = spec.kernel(base, deltas, generator=torch.Generator().manual_seed(1), **params)
    half = spec.kernel(base.half(), deltas.half(), generator=torch.Generator().manual_seed(1), **params)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), full, atol=5e-3, rtol=5e-3)


def test_dare_masks_are_the_ones_bernoulli_draws_from_the_same_cpu_generator():
    # Runs recorded before masks were drawn by thresholding `uniform_` must keep their weights.
    from evomerge.merge.ops.sparsify import bernoulli_mask

    probs = torch.tensor([0.5, 0.3, 1.0, 0.0])[:, None].expand(4, 50_000)
    drawn = bernoulli_mask(probs, torch.Generator().manual_seed(11))
    expected = torch.bernoulli(probs, generator=torch.Generator().manual_seed(11))
    assert torch.equal(drawn, expected)
    assert drawn[2].all() and not drawn[3].any()
    torch.testing.assert_close(drawn[:2].mean(dim=1), torch.tensor([0.5, 0.3]), atol=0.01, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trims_keep_what_float32_kthvalue_keeps(dtype: torch.dtype) -> None:
    # Half-precision thresholds are counted from bit patterns; the same values held in float32 go
    # through kthvalue. Coarse values make many ties at the thresholds; -0.0 and 0.0 must count alike.
    from evomerge.merge.ops.sparsify import trim_magnitude, trim_outliers

    generator = torch.Generator().manual_seed(3)
    deltas = (torch.randint(-40, 41, (3, 64, 33), generator=generator) / 8).to(dtype)
    deltas[0, 0, :5] = -0.0
    deltas[1, 2, :3] = torch.tensor([1e-7, 5e4, -5e4]).to(dtype)  # subnormal / large
    for density in ([0.5, 0.5, 0.5], [0.1, 0.73, 1.0], [0.0, 0.002, 0.999]):
        half = trim_magnitude(deltas, density)
        full = trim_magnitude(deltas.float(), density)
        assert torch.equal(half, full), density
        gamma = [0.01, 0.05, 0.2]
        outliers = trim_outliers(deltas, density, gamma)
        assert torch.equal(outliers, trim_outliers(deltas.float(), density, gamma))
