"""Batched greedy decoding with our own KV-cache loop, and batched log-likelihood scoring.

Why not `model.generate`: the search evaluates thousands of candidates on the same prompts, so we
tokenise once, sort by length, stop each row at EOS *or a stop string* and drop out of the loop as
soon as every row is done. The loop is plain `forward` calls on a `DynamicCache`; the outputs are
token-for-token what `generate(do_sample=False)` gives per example (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class Generated:
    """One row's greedy continuation: token ids (EOS excluded) and why it stopped."""

    ids: list[int]
    stopped_by: str  # "eos" | "stop" | "length"


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows into (input_ids, attention_mask) so every row's last token is aligned."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts real tokens right; their positions must still start at 0 (RoPE), exactly as
    # `generate` computes them: cumulative count of real tokens minus one, pads clamped to 0.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _image_inputs(model: PreTrainedModel, pixel_values: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """`pixel_values` on the model's device and dtype (the processor makes float32), or nothing."""
    if pixel_values is None:
        return {}
    param = next(model.parameters())
    return {"pixel_values": pixel_values.to(device=param.device, dtype=param.dtype)}


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    stop_hit: Callable[[list[int]], bool] | None = None,
    stop_window: int = 8,
    pixel_values: torch.Tensor | None = None,
) -> list[Generated]:
    """Greedy-decode one batch of token-id prompts with a KV cache.

    `stop_hit(tail_ids)` is asked, for rows still running only, whether the decoded tail of their
    generation (last `stop_window` tokens) contains a stop string; such rows stop right there.
    Finished rows leave the batch (and the cache); the loop ends when no row is left.
    `pixel_values` (one image per prompt, image models only) are read on the first step only: their
    features then live in the KV cache, as in `generate`.
    """
    device = next(model.parameters()).device
    input_ids, mask = left_pad(prompts, pad_id, device)
    batch = input_ids.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)) or [-1], device=device)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=_positions(mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **_image_inputs(model, pixel_values),
    )
    position = _positions(mask)[:, -1:]
    next_ids = out.logits[:, -1, :].argmax(-1)
    generated: list[list[int]] = [[] for _ in range(batch)]
    reason = ["length"] * batch
    alive = list(range(batch))  # original row of each position in the (shrinking) batch
    for step in range(max_new_tokens):
        tokens, is_eos = next_ids.tolist(), torch.isin(next_ids, eos).tolist()
        keep = []
        for slot, row in enumerate(alive):
            if is_eos[slot]:
                reason[row] = "eos"
                continue
            generated[row].append(tokens[slot])
            if stop_hit is not None and stop_hit(generated[row][-stop_window:]):
                reason[row] = "stop"
                continue
            keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            # Drop finished rows from the batch and the KV cache: later steps cost only what is running.
            selected = torch.tensor(keep, device=device)
            cache.batch_select_indices(selected)
            mask, position, next_ids = mask[selected], position[selected], next_ids[selected]
            alive = [alive[slot] for slot in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        position = position + 1
        out = model(
            input_ids=next_ids[:, None],
            attention_mask=mask,
            position_ids=position,
            cache=cache,
            use_cache=True,
        )
        next_ids = out.logits[:, -1, :].argmax(-1)
    return [Generated(ids, why) for ids, why in zip(generated, reason, strict=True)]


@torch.inference_mode()
def continuation_logprobs(
    model: PreTrainedModel,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    pixel_values: torch.Tensor | None = None,
    against_rival: bool = False,
    zero_if_lost: bool = False,
) -> list[float]:
    """Sum of log p(continuation | context) for each (context_ids, continuation_ids) pair, one batch.
    `pixel_values` holds one image per pair for image models (its placeholder tokens are in the context).

    `against_rival`: instead, the sum over continuation tokens of log(p(token) / (p(token) + p(rival))),
    the rival being the most probable other token at that position: the log of the chance that each
    reference token wins a two-way race against its strongest rival. Every factor is above 1/2 exactly
    when greedy decoding writes the continuation, so it is a graded version of greedy correctness.

    Rows are right-padded (causal attention never looks right, so no position fix is needed) and
    only the continuation positions are put through log-softmax, to keep memory at B x T x V once.
    """
    device = next(model.parameters()).device
    rows = [list(ctx) + list(cont) for ctx, cont in pairs]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **_image_inputs(model, pixel_values)
    ).logits
    totals = []
    for i, (ctx, cont) in enumerate(pairs):
        start, end = len(ctx), len(ctx) + len(cont)
        # Logits at position t predict token t+1, hence the shift by one.
        logprobs = logits[i, start - 1 : end - 1].float().log_softmax(-1)
        target = ids[i, start:end].to(device)[:, None]
        chosen = logprobs.gather(-1, target)[:, 0]
        if against_rival:
            rival = logprobs.scatter(-1, target, float("-inf")).max(-1).values
            lost = bool((chosen <= rival).any())
            chosen = torch.nn.functional.logsigmoid(chosen - rival)  # log(p / (p + p_rival))
            if zero_if_lost and lost:
                totals.append(float('-inf'))
                continue
        totals.append(float(chosen.sum()))
    return totals


__all__ = ["Generated", "continuation_logprobs", "greedy_generate", "left_pad"]
