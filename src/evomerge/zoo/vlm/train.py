"""The VLM zoo's model: a tiny Llava whose language model starts as the text zoo's base, and its training.

The vision tower (a 2-layer CLIP encoder over 4 x 4 patches) and the projector are trained from scratch
with a high learning rate; the language model is fine-tuned gently (a specialist's learning rate, a
replay of the text zoo's base mixture), so it stays a small step from the base, as a real VLM's
language model stays close to the LLM it was made from. That closeness is what merging needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from evomerge.zoo.tasks import Family
from evomerge.zoo.train import IGNORE_INDEX, TrainConfig, encode_batch, optimise, sample_batch
from evomerge.zoo.vlm.scenes import IMAGE_SIZE, QUESTIONS, Scene, draw_scene, render, visual_problem

PATCH_SIZE = 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
#: The char tokenizer's `<unk>` is the image placeholder: no character ever maps to it, and the VLM's
#: vocabulary stays the text zoo's token for token, which merging the two language models needs.
IMAGE_TOKEN = "<unk>"


@dataclass(frozen=True)
class VlmTrainConfig:
    """One VLM training run: steps, batch, the two learning rates and the share of text replay."""

    steps: int
    batch_size: int
    lr_vision: float
    lr_language: float
    text_replay: float
    warmup: int = 50

    def lr_scale(self, step: int) -> float:
        """The text zoo's schedule as a factor of each peak: linear warm-up, cosine decay to 0.1.

        The decay matters: at a constant rate the counting skill came and went (1.0, then 0.62 a hundred
        steps later, then 1.0 again, measured on held-out pictures), so a build's last step decided it.
        """
        return TrainConfig(self.steps, 1.0, self.batch_size, (), warmup=self.warmup).lr_at(step)


def make_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """The Llava processor of the zoo's pictures: no resizing (they are made at the tower's size),
    pixels scaled to [-1, 1], one placeholder per patch (CLIP's class feature is dropped)."""
    image_processor = CLIPImageProcessorPil(
        do_resize=False, do_center_crop=False, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def initial_vlm(text_base: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlavaForConditionalGeneration:
    """A Llava with a freshly initialised (seeded) vision tower and projector and the text base's weights."""
    base = LlamaForCausalLM.from_pretrained(text_base, dtype=torch.float32)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=base.config, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.lm_head.load_state_dict(base.lm_head.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def visual_batch(
    rng: random.Random, held_out: frozenset[Scene], size: int, processor: LlavaProcessor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, labels, pixel_values)`` of ``size`` language-1 visual questions on training scenes."""
    vocab = processor.tokenizer.get_vocab()
    rows, images = [], []
    while len(rows) < size:
        scene = draw_scene(rng)
        if scene in held_out:
            continue
        question, reply = visual_problem(scene, rng.choice(QUESTIONS), 1)
        rows.append(([vocab[IMAGE_TOKEN]] * IMAGE_TOKENS + [vocab[c] for c in question + "="], [vocab[c] for c in reply + "\n"]))
        images.append(render(scene))
    # Every row has the same length (one-letter questions, one-digit answers): no padding needed.
    input_ids = torch.tensor([prompt + completion for prompt, completion in rows])
    labels = input_ids.clone()
    labels[:, : len(rows[0][0])] = IGNORE_INDEX
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return input_ids, labels, pixels


def train_vlm(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    families: Mapping[str, Family],
    mixture: tuple[tuple[str, float], ...],
    held_out: frozenset[Scene],
    config: VlmTrainConfig,
    *,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train in place: each step is a visual batch or (with probability ``text_replay``) a text batch."""
    rng = random.Random(seed)
    language = [p for name, p in model.named_parameters() if "language_model" in name or name.startswith("lm_head")]
    others = [p for name, p in model.named_parameters() if not ("language_model" in name or name.startswith("lm_head"))]
    groups = [{"params": others, "lr": config.lr_vision}, {"params": language, "lr": config.lr_language}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    peaks = [config.lr_vision, config.lr_language]
    tokenizer = processor.tokenizer

    def loss_at(step: int) -> torch.Tensor:
        if rng.random() < config.text_replay:
            batch = sample_batch(rng, families, mixture, config.batch_size)
            input_ids, mask, labels = encode_batch(batch, tokenizer.get_vocab(), tokenizer.pad_token_id)
            return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        input_ids, labels, pixels = visual_batch(rng, held_out, config.batch_size, processor)
        return model(input_ids=input_ids, pixel_values=pixels, labels=labels).loss

    return optimise(
        model, optimizer, config.steps, lambda step: [peak * config.lr_scale(step) for peak in peaks], loss_at, on_step
    )


__all__ = ["IMAGE_TOKEN", "IMAGE_TOKENS", "VlmTrainConfig", "initial_vlm", "make_processor", "train_vlm", "visual_batch"]
