"""Loading a causal LM and its tokenizer for evaluation: local files, safetensors, no remote code."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from evomerge.errors import ConfigError, ModelError
from evomerge.evaluate.engine import default_dtype
from evomerge.models import refuse_remote_code
from evomerge.models.sources import read_json


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device this machine has, else a `ConfigError` naming it (checked before any load)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {str(device)!r} is not a device name torch knows (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} was requested but CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif resolved.type != "cpu":
        raise ConfigError(f"device {str(device)!r} is not supported; use cpu or cuda")
    return resolved


def load_causal_lm(
    ref: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | ProcessorMixin]:
    """Load `ref` (a local Hugging Face directory) with transformers, never running remote code.

    Only safetensors weights are read unless `allow_pickle` (pickled `.bin` files can execute code).
    An image-text model (a config with a `vision_config`, e.g. Llava) is loaded with
    `AutoModelForImageTextToText` and returned with its `AutoProcessor` instead of the tokenizer; the
    `Evaluator` takes either.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load progress bar only clutters the search's live display

    resolve_device(device)
    path = Path(ref)
    if not (path / "config.json").is_file():
        raise ModelError(f"model {path} is not a local model directory with a config.json")
    refuse_remote_code(path)
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors and not allow_pickle:
        raise ModelError(
            f"model {path} has no safetensors weights; pass --allow-pickle to load pickled weights"
        )
    vision = is_image_text_model(path)
    try:
        loader = AutoProcessor if vision else AutoTokenizer
        tokenizer = loader.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(
            path,
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=has_safetensors,
            dtype=dtype or default_dtype(device),
        )
    except (OSError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:200]
        raise ModelError(f"model {path} cannot be loaded with transformers ({reason})") from None
    if vision and not isinstance(tokenizer, ProcessorMixin):
        raise ModelError(f"model {path} is an image-text model but has no processor files (processor_config.json)")
    return model.to(device).eval(), tokenizer


def is_image_text_model(ref: str | os.PathLike[str]) -> bool:
    """True for a model directory whose config has a vision tower (`vision_config`), e.g. Llava."""
    config = read_json(Path(ref) / "config.json")
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


__all__ = ["is_image_text_model", "load_causal_lm"]
