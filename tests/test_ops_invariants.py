"""Property-based invariants of the merge operators (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.ops.sparsify import magnitude_keep_count, trim_magnitude
from evomerge.merge.registry import get_operator

FAST = settings(max_examples=25)
shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)


def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# parameters under which merging N copies of one model must return that model
SELF_MERGE = {
    "task_arithmetic": {"normalize": True},
    "ties": {"density": 1.0},
    "dare_ties": {"density": 1.0, "normalize": True},
    "dare_linear": {"density": 1.0, "normalize": True},
    "breadcrumbs": {"density": 1.0, "normalize": True},
    "breadcrumbs_ties": {"density": 1.0, "normalize": True},
    "della": {"density": 1.0},
    "della_linear": {"density": 1.0, "normalize": True},
    "model_stock": {},
    "linear": {},
}


@pytest.mark.parametrize("name", sorted(SELF_MERGE))
@FAST
@given(shape=shapes, seed=seeds, n=st.integers(2, 4), weight=st.floats(0.1, 2.0))
def test_merging_copies_of_one_model_returns_it(name: str, shape, seed: int, n: int, weight: float) -> None:
    spec = get_operator(name)
    base, model = random_tensor(shape, seed), random_tensor(shape, seed + 1)
    params = dict(SELF_MERGE[name])
    if spec.param_names().count("weight"):
        params["weight"] = [weight] * n
    generator = torch.Generator().manual_seed(seed)
    if spec.space == "delta":
        deltas = (model - base).expand(n, *shape).clone()
        before = deltas.clone()
        out = spec.kernel(base, deltas, generator=generator, **params)
        torch.testing.assert_close(deltas, before, rtol=0, atol=0)  # inputs are never modified
    else:
        out = spec.kernel(model.expand(n, *shape).clone(), base, generator=generator, **params)
    torch.testing.assert_close(out, model, atol=1e-5, rtol=1e-5)


@FAST
@given(shape=shapes, seed=seeds, t=st.sampled_from([0.0, 1.0]))
def test_slerp_endpoints(shape, seed: int, t: float) -> None:
    v0, v1 = random_tensor(shape, seed), random_tensor(shape, seed + 1)
    out = get_operator("slerp").kernel(v1[None], v0, t=t)
    torch.testing.assert_close(out, v0 if t == 0 else v1, atol=1e-6, rtol=1e-6)


@FAST
@given(shape=shapes, seed=seeds, weight=st.floats(0.1, 3.0), normalize=st.booleans())
def test_ties_density_one_single_model_applies_its_task_vector(
    shape, seed: int, weight: float, normalize: bool
) -> None:
    base, delta = random_tensor(shape, seed), random_tensor(shape, seed + 1)
    out = get_operator("ties").kernel(base, delta[None], weight=[weight], normalize=normalize)
    torch.testing.assert_close(out, base + (1.0 if normalize else weight) * delta, atol=1e-5, rtol=1e-5)


@FAST
@given(numel=st.integers(1, 300), density=st.floats(0.0, 1.0), seed=seeds)
def test_trim_keeps_exactly_k_when_magnitudes_are_distinct(numel: int, density: float, seed: int) -> None:
    # a random permutation of distinct magnitudes with random signs
    generator = torch.Generator().manual_seed(seed)
    magnitudes = torch.randperm(numel, generator=generator).float() + 1
    signs = torch.randint(0, 2, (numel,), generator=generator).float() * 2 - 1
    delta = magnitudes * signs
    trimmed = trim_magnitude(delta[None], [density])[0]
    k = int(density * numel) if density < 1 else numel
    k = max(1, k) if density > 0 else 0
    assert magnitude_keep_count(density, numel) == k
    kept = trimmed != 0
    assert int(kept.sum()) == k
    assert torch.equal(trimmed[kept], delta[kept])
    if 0 < k < numel:  # every kept magnitude beats every dropped one
        assert magnitudes[kept].min() > magnitudes[~kept].max()


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_unbiased_and_drops_one_minus_density(name: str) -> None:
    density, seeds_n = 0.3, 2000
    base = torch.zeros(50)
    delta = torch.linspace(-2, 2, 50) + 0.01  # no zero entries
    spec = get_operator(name)
    outs = torch.stack([
        spec.kernel(base, delta[None], generator=torch.Generator().manual_seed(s), weight=[1.0], density=density)
        for s in range(seeds_n)
    ])  # fmt: skip
    # per entry, out = delta * m / density with m ~ Bernoulli(density): std = |delta| sqrt((1-d)/d / S)
    std = delta.abs() * ((1 - density) / density / seeds_n) ** 0.5
    assert ((outs.mean(dim=0) - delta).abs() / std).max() < 5
    drop_rate = (outs == 0).float().mean().item()  # 100k Bernoulli draws: std 0.0015
    assert abs(drop_rate - (1 - density)) < 0.01


@FAST
@given(n=st.integers(2, 5), dim=st.integers(5, 40), seed=seeds)
def test_model_stock_orthogonal_and_parallel_closed_form(n: int, dim: int, seed: int) -> None:
    base = random_tensor((dim,), seed)
    spec = get_operator("model_stock")
    # orthogonal task vectors (distinct scaled basis vectors): cos 0 -> t 0 -> the base
    scales = torch.rand(n, generator=torch.Generator().manual_seed(seed)) + 0.5
    orthogonal = torch.eye(dim)[:n] * scales[:, None]
    torch.testing.assert_close(spec.kernel(base, orthogonal), base)
    # parallel task vectors: cos 1 -> t = n / n = 1 -> base + mean delta
    parallel = scales[:, None] * random_tensor((dim,), seed + 1)
    torch.testing.assert_close(spec.kernel(base, parallel), base + parallel.mean(dim=0), atol=1e-5, rtol=1e-5)
