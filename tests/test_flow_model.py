"""PathModel: identity with its source, weight sharing, KV-cache-correct decoding over repeated layers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2ForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicCache

from conftest import tiny_gemma2_config
from evomerge.errors import ConfigError
from evomerge.flow import PathModel, PathSpec

# Steps visit B and A, revisit A1 and B3 (so the cache must keep one slot per occurrence), mixed scales.
REPEATED_STEPS = ((0, 0), (1, 1), (0, 1), (0, 1), (1, 3), (0, 2), (1, 3), (0, 3))
REPEATED_SCALES = (1.3, 0.7, 1.0, 1.6, 0.9, 1.2, 0.6, 1.1)


@pytest.fixture(scope="module")
def sources(tiny_llama: Callable[..., Path]) -> list[PreTrainedModel]:
    """Two tiny Llamas with different random weights (seeds 11 and 12)."""
    return [AutoModelForCausalLM.from_pretrained(tiny_llama(seed)).eval() for seed in (11, 12)]


def left_padded_batch(pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 6, 3 and 1, left-padded to 6 tokens."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate((6, 3, 1)):
        ids[row, : 6 - length] = pad_id
        mask[row, : 6 - length] = 0
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding, as a batched generation engine computes them."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def greedy_with_cache(model, ids, mask, new_tokens: int, cache) -> torch.Tensor:
    """Prefill once, then feed one token at a time through the cache."""
    pos = positions(mask)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    generated = []
    for _ in range(new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=pos,
            cache=out.cache,
            use_cache=True,
        )
    return torch.cat(generated, dim=1)


@torch.no_grad()
def greedy_without_cache(model, ids, mask, new_tokens: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Re-run the whole sequence for every new token; also return each step's last-position logits."""
    generated, last_logits = [], []
    for _ in range(new_tokens):
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False
        ).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
        last_logits.append(logits[:, -1])
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(generated, dim=1), last_logits


def test_identity_path_reproduces_the_source(sources: list[PreTrainedModel]) -> None:
    model_a = sources[0]
    spec = PathSpec((4, 4), tuple((0, layer) for layer in range(4)), (1.0,) * 4)
    path = PathModel(sources, spec).eval()
    ids, mask = left_padded_batch(model_a.config.pad_token_id)
    with torch.no_grad():
        expected = model_a(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        actual = path(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


def test_path_shares_the_source_tensors(sources: list[PreTrainedModel]) -> None:
    path = PathModel(sources, PathSpec((4, 4), REPEATED_STEPS, REPEATED_SCALES))
    assert path.step_layer(2) is path.step_layer(3) is sources[0].model.layers[1]
    assert path.step_layer(4) is path.step_layer(6) is sources[1].model.layers[3]
    assert path.embed_tokens.weight.data_ptr() == sources[0].model.embed_tokens.weight.data_ptr()
    source_ptrs = {p.data_ptr() for source in sources for p in source.parameters()}
    assert {p.data_ptr() for p in path.parameters()} <= source_ptrs
    # 6 distinct layers on the path, each registered once.
    assert len(path.layers) == 6
    assert (path.config.num_hidden_layers, path.device, path.dtype) == (8, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("with_config", [True, False], ids=["cache-from-config", "lazy-cache"])
def test_cached_greedy_matches_full_forward_over_repeated_layers(
    sources: list[PreTrainedModel], with_config: bool
) -> None:
    path = PathModel(sources, PathSpec((4, 4), REPEATED_STEPS, REPEATED_SCALES)).eval()
    ids, mask = left_padded_batch(sources[0].config.pad_token_id)
    cache = DynamicCache(config=path.config) if with_config else DynamicCache()
    cached = greedy_with_cache(path, ids, mask, 8, cache)
    uncached, _ = greedy_without_cache(path, ids, mask, 8)
    assert torch.equal(cached, uncached)
    assert len(cache.layers) == len(REPEATED_STEPS)
    # Every step slot holds the 6 prompt positions + the 8 generated tokens (each is fed back).
    assert {layer.keys.shape[-2] for layer in cache.layers} == {6 + 8}


def test_cached_logits_match_uncached_logits(sources: list[PreTrainedModel]) -> None:
    path = PathModel(sources, PathSpec((4, 4), REPEATED_STEPS, REPEATED_SCALES)).eval()
    ids, mask = left_padded_batch(sources[0].config.pad_token_id)
    tokens, full_logits = greedy_without_cache(path, ids, mask, 4)
    cache = DynamicCache(config=path.config)
    with torch.no_grad():
        out = path(
            ids, attention_mask=mask, position_ids=positions(mask), cache=cache, use_cache=True
        )
        torch.testing.assert_close(out.logits[:, -1], full_logits[0], rtol=0, atol=1e-5)
        for step in range(1, 4):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = path(
                tokens[:, step - 1 : step],
                attention_mask=mask,
                position_ids=positions(mask)[:, -1:],
                cache=cache,
                use_cache=True,
            )
            torch.testing.assert_close(out.logits[:, -1], full_logits[step], rtol=0, atol=1e-5)


def test_scales_change_the_output(sources: list[PreTrainedModel]) -> None:
    ids, mask = left_padded_batch(sources[0].config.pad_token_id)
    unit = PathModel(sources, PathSpec((4, 4), REPEATED_STEPS, (1.0,) * 8))
    scaled = PathModel(sources, PathSpec((4, 4), REPEATED_STEPS, REPEATED_SCALES))
    with torch.no_grad():
        difference = (
            (unit(ids, attention_mask=mask).logits - scaled(ids, attention_mask=mask).logits).abs().max()
        )
    assert difference > 1e-3


def test_sources_of_different_hidden_size_are_refused(tiny_llama: Callable[..., Path]) -> None:
    small = AutoModelForCausalLM.from_pretrained(tiny_llama(11))
    wide = AutoModelForCausalLM.from_pretrained(tiny_llama(13, hidden_size=48))
    with pytest.raises(ConfigError, match="different hidden size"):
        PathModel([small, wide], PathSpec((4, 4), ((0, 0), (1, 0)), (1.0, 1.0)))


def test_unsupported_architecture_is_refused() -> None:
    config = tiny_gemma2_config()
    gemma = Gemma2ForCausalLM(config)
    with pytest.raises(ConfigError, match="model_type 'gemma2'"):
        PathModel([gemma], PathSpec((2,), ((0, 0),), (1.0,)))


def test_spec_layer_count_must_match_the_source(sources: list[PreTrainedModel]) -> None:
    with pytest.raises(ConfigError, match="source 1 has 4 layers but the path spec says 6"):
        PathModel(sources, PathSpec((4, 6), ((0, 0),), (1.0,)))
