"""Deterministic training of zoo models on weighted mixtures of synthetic problem families."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.tasks import Family, sequence

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainConfig:
    """One training run: optimiser schedule and the mixture ``{family name: weight}`` it samples from."""

    steps: int
    lr: float
    batch_size: int
    mixture: tuple[tuple[str, float], ...]
    warmup: int = 50
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)


def encode_batch(
    pairs: list[tuple[str, str]], vocab: Mapping[str, int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; only completion tokens carry a loss.

    Masking the prompt makes the objective the model's conditional answer distribution, which is
    what every zoo task scores; the prompts are random numbers with nothing learnable in them.
    """
    ids = [[vocab[c] for c in prompt + completion] for prompt, completion in pairs]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, ((prompt, _), tokens) in enumerate(zip(pairs, ids)):
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, len(prompt) : len(tokens)] = input_ids[row, len(prompt) : len(tokens)]
    return input_ids, mask, labels


def sample_batch(
    rng: random.Random, families: Mapping[str, Family], mixture: tuple[tuple[str, float], ...], size: int
) -> list[tuple[str, str]]:
    """Draw ``size`` (prompt, completion) pairs, each from a family chosen with the mixture's weights."""
    names = [name for name, _ in mixture]
    weights = [weight for _, weight in mixture]
    chosen = rng.choices(names, weights=weights, k=size)
    return [sequence(families[name].sample(rng)) for name in chosen]


@contextmanager
def deterministic_torch(seed: int):
    """Single-threaded, deterministic kernels and a seeded global RNG for the duration of a build.

    CPU reductions may split work differently with another thread count, which changes float sums;
    one thread makes a build bit-identical on any machine with the same torch build.
    """
    # cuBLAS refuses deterministic mode without a fixed workspace; it reads this when its handle is made.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    families: Mapping[str, Family],
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` in place with AdamW on its mixture; returns the loss of every step.

    Data order depends only on ``seed`` (a dedicated `random.Random`), never on global state.
    ``on_step(steps_done)`` is called after every optimiser step (progress display).
    """
    vocab = tokenizer.get_vocab()
    rng = random.Random(seed)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )

    def loss_at(step: int) -> torch.Tensor:
        batch = sample_batch(rng, families, config.mixture, config.batch_size)
        input_ids, mask, labels = (t.to(device) for t in encode_batch(batch, vocab, tokenizer.pad_token_id))
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    return optimise(model, optimizer, config.steps, lambda step: [config.lr_at(step)], loss_at, on_step)


def optimise(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    rates_at: Callable[[int], list[float]],
    loss_at: Callable[[int], torch.Tensor],
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """The zoo's training loop, shared by every zoo model: per step, each parameter group's learning rate
    from ``rates_at(step)``, then ``loss_at(step)``, gradients clipped at norm 1, one optimiser step.
    Returns every step's loss; the model is left in eval mode."""
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group, rate in zip(optimizer.param_groups, rates_at(step), strict=True):
            group["lr"] = rate
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses
