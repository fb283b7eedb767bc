"""Shared fixtures: tiny real Hugging Face checkpoints, built once per test session."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.tokenizer import build_char_tokenizer

TEST_CHARACTERS = string.digits + string.ascii_lowercase + " +-*=?.,:\n"


def make_llama(
    out_dir: Path,
    *,
    seed: int,
    hidden_size: int = 32,
    num_layers: int = 4,
    vocab_characters: str = TEST_CHARACTERS,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised `LlamaForCausalLM` with a char tokenizer to `out_dir`."""
    tokenizer = build_char_tokenizer(vocab_characters)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of tiny Llama checkpoints, cached per (seed, options) for the whole session."""
    cache: dict[tuple, Path] = {}

    def build(seed: int = 0, **options) -> Path:
        key = (seed, tuple(sorted(options.items())))
        if key not in cache:
            out_dir = tmp_path_factory.mktemp(f"llama_s{seed}")
            cache[key] = make_llama(out_dir, seed=seed, **options)
        return cache[key]

    return build
