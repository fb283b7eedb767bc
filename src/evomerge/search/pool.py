"""Parents chosen from a pool (`parents_pool`, `max_parents`): the pre-screen and the selection rule.

The genome gets one selection gene per screened pool model, in [0, 1] like every other gene, so CMA-ES,
NSGA-II and the rest search it unchanged; `selected` turns the genes into the parents a candidate merges.

The screen is cheap and runs before any merge: it streams the pool's tensors once against the base and
records every model's task-vector norm relative to the base and the pairwise task-vector cosine
similarities. A model whose task vector is a large share of the base's own norm was not fine-tuned from
that base (another pretraining of the same shape: merging its "task vector" would add a whole other
model), so it is left out with the reason recorded; a model of another shape or tokenizer is refused
outright by the compatibility check (`CompatibilityError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.models import Checkpoint, check_compatible

SELECT = "select"  # the selection genes' parameter name in gene names (`select.m0`, ...)
SELECTED_AT = 0.5  # a selection gene at or above this picks its model


def selected(genes: Sequence[float], max_parents: int) -> list[int]:
    """Pool indices a candidate merges, in pool order: genes >= 0.5, the `max_parents` highest of them
    (lower index on ties); if no gene reaches 0.5, the single highest (a merge needs a model)."""
    ranked = sorted(range(len(genes)), key=lambda i: (-genes[i], i))
    chosen = [i for i in ranked if genes[i] >= SELECTED_AT][:max_parents] or ranked[:1]
    return sorted(chosen)


@dataclass(frozen=True)
class PoolScreen:
    """What the screen measured, per pool model (pool order) and per pair."""

    models: list[str]
    distance: list[float]  # ||model - base|| / ||base||
    cosine: list[list[float]]  # task-vector cosine similarity
    rejected: dict[str, str]  # model -> why it was left out

    @property
    def kept(self) -> list[str]:
        return [model for model in self.models if model not in self.rejected]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def screen_pool(base: str, pool: Sequence[str], *, max_distance: float, allow_pickle: bool = False) -> PoolScreen:
    """Task-vector geometry of every pool model against `base`; refuses incompatible models."""
    base_checkpoint = Checkpoint.open(base, allow_pickle=allow_pickle)
    checkpoints = [Checkpoint.open(ref, allow_pickle=allow_pickle) for ref in pool]
    check_compatible(checkpoints, base=base_checkpoint)
    gram = torch.zeros(len(pool), len(pool), dtype=torch.float64)
    base_squared = 0.0
    for name in base_checkpoint.tensor_names():
        reference = base_checkpoint.get(name, dtype=torch.float64).flatten()
        deltas = torch.stack([c.get(name, dtype=torch.float64).flatten() - reference for c in checkpoints])
        gram += deltas @ deltas.T
        base_squared += float(reference @ reference)
        for checkpoint in (base_checkpoint, *checkpoints):
            checkpoint.release(name)
    norms = gram.diagonal().sqrt()
    cosine = gram / torch.outer(norms, norms).clamp_min(1e-30)
    distance = (norms / base_squared**0.5).tolist()
    rejected = {
        ref: f"its task vector is {d:.2f} of the base's norm (limit {max_distance:g}): not a fine-tune of {Path(base).name}"
        for ref, d in zip(pool, distance, strict=True) if d > max_distance
    }
    return PoolScreen(list(pool), distance, cosine.tolist(), rejected)
