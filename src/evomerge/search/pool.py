"""Parents chosen from a pool (`parents_pool`, `max_parents`): the pre-screen and the selection rule.

The genome gets one selection gene per screened pool model, in [0, 1] like every other gene, so CMA-ES,
NSGA-II and the rest search it unchanged; `selected` turns the genes into the parents a candidate merges.

Where CMA-ES starts in the selection genes comes from the parents' own search-split answers
(`covering_choice`): the pool models that together answer the most examples, each at its best, start
selected and the others unselected, so the first generations merge a plausible set instead of whichever
models come first in the pool.

The screen is cheap and runs before any merge: it streams the pool's tensors once against the base and
records every model's task-vector norm relative to the base and the pairwise task-vector cosine
similarities. A model whose task vector is a large share of the base's own norm was not fine-tuned from
that base (another pretraining of the same shape: merging its "task vector" would add a whole other
model), so it is left out with the reason recorded; a model of another shape or tokenizer is refused
outright by the compatibility check (`CompatibilityError`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.models import Checkpoint, check_compatible

SELECT = "select"  # the selection genes' parameter name in gene names (`select.math`, ...)
SELECTED_AT = 0.5  # a selection gene at or above this picks its model
#: Where `covering_choice` starts a chosen model's selection gene and an unchosen one's: 2.4 of CMA-ES's
#: initial step (1/6 of the gene's range) from the threshold, so about 1 in 100 samples flips a gene and the
#: search moves the selection only where fitness pulls its mean. At 1.5 steps (0.75 / 0.25) a third of the
#: first generation merged another set, and on the zoo a lucky search-split score of such a set became the
#: champion (pool benchmark, seed 1 of 2 measured: language and strings, 0.063 worse on the test split).
START_SELECTED, START_UNSELECTED = 0.9, 0.1


def selected(genes: Sequence[float], max_parents: int) -> list[int]:
    """Pool indices a candidate merges, in pool order: genes >= 0.5, the `max_parents` highest of them
    (lower index on ties); if no gene reaches 0.5, the single highest (a merge needs a model)."""
    ranked = sorted(range(len(genes)), key=lambda i: (-genes[i], i))
    chosen = [i for i in ranked if genes[i] >= SELECTED_AT][:max_parents] or ranked[:1]
    return sorted(chosen)


def covering_choice(
    answers: Sequence[Mapping[str, Sequence[float]] | None],
    signed_weights: Sequence[tuple[str, float]],
    max_parents: int,
) -> list[int]:
    """Pool indices (in pool order) of the models that together answer the search split best: greedily,
    the model that most raises the weighted objective of the per-example best answer among those chosen
    (an oracle routing each example to its best chosen model), while it rises, at most `max_parents`.

    `answers[i]` maps each task to model i's per-example values (None: it failed and is never chosen);
    `signed_weights` are the objectives' weights, negated for a minimised task. A model that only answers
    what a chosen one already answers (a degraded copy) or nothing at all (an irrelevant specialist) adds
    nothing and is left out; the single best model is chosen even if nothing rises.
    """
    scored = [i for i, a in enumerate(answers) if a is not None]
    if not scored:
        return []
    tables = {
        task: np.array([answers[i][task] for i in scored], dtype=np.float64) * np.sign(weight)
        for task, weight in signed_weights
    }

    def value(members: list[int]) -> float:
        return sum(abs(weight) * tables[task][members].max(axis=0).mean() for task, weight in signed_weights)

    chosen: list[int] = []
    current = -np.inf
    while len(chosen) < max_parents:
        gains = {row: value(chosen + [row]) for row in range(len(scored)) if row not in chosen}
        if not gains:
            break
        row = max(gains, key=lambda r: (gains[r], -r))
        if chosen and gains[row] <= current + 1e-12:
            break
        chosen.append(row)
        current = gains[row]
    return sorted(scored[row] for row in chosen)


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
