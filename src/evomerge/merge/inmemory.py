"""In-memory merging for the search: parents resident once, each candidate written into a live model.

The search merges thousands of candidates from the same parents with the same operator. Reading the
parents and forming task vectors is done once here; a candidate then costs one kernel call per tensor
and an in-place copy into the live module's parameters — no disk I/O, no new model objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from evomerge.errors import ConfigError
from evomerge.merge.plan import (
    NonFiniteWeightsError,
    TensorJob,
    apply_job,
    job_parameters,
    plan_jobs,
    require_finite,
)
from evomerge.merge.recipe import Recipe
from evomerge.merge.stream import check_parents, open_parents
from evomerge.models import Checkpoint, CompatReport


@dataclass
class _Resident:
    base: torch.Tensor | None
    stacked: torch.Tensor  # task vectors for delta-space operators, raw weights otherwise


class InMemoryMerger:
    """Merge candidates of one recipe family (same method and base; the template's parents or an ordered
    subset of them) without touching disk."""

    def __init__(self, template: Recipe, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if template.slices is not None:
            raise ConfigError("the in-memory merger takes `models` recipes; layer slices change the architecture")
        self.template = template
        self.spec = template.operator
        self.device = torch.device(device)
        self.dtype = dtype
        self.checkpoints: dict[str, Checkpoint] = open_parents(template)
        self.compat: CompatReport = check_parents(template, self.checkpoints)
        self._resident: dict[str, _Resident] = {}
        self._copied: set[str] = set()  # tensors copied verbatim; yielded as views of resident memory
        for job in plan_jobs(template, self.spec, self.checkpoints):
            self._resident[job.out_name] = self._load(job)
            if job.copy:
                self._copied.add(job.out_name)

    def _load(self, job: TensorJob) -> _Resident:
        def get(ref: str, name: str) -> torch.Tensor:
            return self.checkpoints[ref].get(name, device=self.device, dtype=self.dtype)

        stacked = torch.stack([get(src.ref, src.tensor) for src in job.inputs])
        base = get(job.base.ref, job.base.tensor) if job.base is not None else None
        if self.spec.space == "delta" and not job.copy and base is not None:
            stacked -= base  # task vectors, formed once for all candidates
        return _Resident(base, stacked)

    @property
    def donor(self) -> Checkpoint:
        """The parent whose config and tokenizer a merged model uses."""
        return self.checkpoints[self.template.donor_ref()]

    def resident_bytes(self) -> int:
        """Device memory held by the resident parents."""
        total = 0
        for resident in self._resident.values():
            total += resident.stacked.numel() * resident.stacked.element_size()
            if resident.base is not None:
                total += resident.base.numel() * resident.base.element_size()
        return total

    def _rows(self, recipe: Recipe) -> list[int] | None:
        """The resident rows a candidate merges: None for every parent, else the indices of the subset of
        the template's parents it uses, in template order (a search choosing its parents from a pool)."""
        same = (
            recipe.method == self.template.method
            and recipe.base_model == self.template.base_model
            and recipe.submodule == self.template.submodule
        )
        template = [m.model for m in self.template.models]
        models = [m.model for m in recipe.models]
        rows = [template.index(m) for m in models] if same and set(models) <= set(template) else []
        if not rows or rows != sorted(set(rows)):
            raise ConfigError("a candidate recipe must use the merger's method, base model and (some of its) parents")
        return None if models == template else rows

    def tensors(self, recipe: Recipe, *, check_finite: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, merged tensor)` for a candidate recipe, on the merger's device."""
        rows = self._rows(recipe)
        for job in plan_jobs(recipe, self.spec, self.checkpoints):
            resident = self._resident[job.out_name]
            if job.copy:  # from one donor, whatever the parents
                yield job.out_name, resident.stacked[0]
                continue
            stacked = resident.stacked if rows is None else resident.stacked[rows]
            delta_space = self.spec.space == "delta"
            merged = apply_job(
                self.spec,
                resident.base,
                stacked,
                job_parameters(self.spec, job),
                seed=recipe.seed,
                out_name=job.out_name,
                deltas=stacked if delta_space else None,
            )
            if check_finite:
                require_finite(merged, job.out_name)
            yield job.out_name, merged

    def state_dict(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """The merged weights of a candidate as a new state dict."""
        return {name: tensor.clone() if name in self._copied else tensor for name, tensor in self.tensors(recipe)}

    def merge_into(self, module: nn.Module, recipe: Recipe) -> None:
        """Overwrite a live module's parameters with the candidate's merged weights, in place.

        Tensors are written as they are computed, so only one merged tensor is alive at a time (a 7B
        model has no room for a second copy on the device); a candidate that fails part-way (non-finite
        weights) leaves the module partly overwritten until the next candidate is merged into it.
        """
        targets = checkpoint_named_tensors(module)
        with torch.no_grad():
            for name, tensor in self.tensors(recipe):
                target = targets.get(name)
                if target is None:
                    raise ConfigError(f"the live model has no parameter named {name}")
                target.data.copy_(tensor)


def checkpoint_named_tensors(module: nn.Module) -> Mapping[str, torch.Tensor]:
    """A live module's parameters and buffers under the names its checkpoint files use.

    transformers 5 renames some models' modules at load (Llava's `language_model.model.layers.N` is the
    live `model.language_model.layers.N`, its `language_model.lm_head` the live `lm_head`) and renames
    them back on save; merges are planned in checkpoint names, so a live target is found through the
    same reverse mapping `save_pretrained` applies. The tensors are the module's own (in-place writes).
    """
    targets = module.state_dict(keep_vars=True)
    if isinstance(module, PreTrainedModel):
        targets = revert_weight_conversion(module, targets)
    return targets


__all__ = ["InMemoryMerger", "NonFiniteWeightsError", "checkpoint_named_tensors"]  # the error is raised by `tensors`
