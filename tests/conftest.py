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


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `LlavaForConditionalGeneration` (2-layer CLIP tower + the `tiny_llama` text shape, same
    char tokenizer), saved once; its language tower is named `language_model.model.layers.N...`."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_char_tokenizer(TEST_CHARACTERS)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tokenizer) - 1)
    torch.manual_seed(7)
    out_dir = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_task_files(
    directory: Path, search: list[dict], test: list[dict], name: str = "t", **spec_overrides
) -> Path:
    """Write `search`/`test` rows as JSONL and a task YAML (exact scorer unless overridden) next to them."""
    import json

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("search", search), ("test", test)):
        (directory / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": name,
        "data": {"search": f"{name}_search.jsonl", "test": f"{name}_test.jsonl"},
        "prompt": "{question}=",
        "answer_field": "answer",
        "scorer": "exact",
        "generation": {"max_new_tokens": 8, "stop": ["\n"]},
        **spec_overrides,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path
