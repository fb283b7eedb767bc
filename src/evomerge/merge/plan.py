"""From a recipe to per-tensor jobs, and from a job to merged weights.

Both the streaming CLI merge (`stream.run_merge`) and the in-memory merger of the search use this one
module, so the same recipe gives the same numbers on both paths. Everything a recipe can get wrong
(a missing required parameter, a slice beyond a model's depth, an unknown tensor) is found while
planning, before the first tensor is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.params import layer_position, resolve_param
from evomerge.merge.recipe import FilterRule, ParamValue, Recipe
from evomerge.merge.registry import OperatorSpec, ParamSpec
from evomerge.models import Checkpoint, tensor_role, with_layer


@dataclass(frozen=True)
class Source:
    """One tensor of one parent, with the parameters that apply to that parent here."""

    ref: str
    tensor: str
    parameters: tuple[Mapping[str, ParamValue], ...]  # most specific first


@dataclass(frozen=True)
class TensorJob:
    """How one output tensor is made: merged from `inputs` (and `base`), or copied from `inputs[0]`."""

    out_name: str
    inputs: tuple[Source, ...]
    base: Source | None
    t: float
    global_parameters: tuple[Mapping[str, ParamValue], ...]
    copy: bool = False


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Seed of a random operator for one tensor: independent of tensor order, worker and device."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _merged_refs(recipe: Recipe, spec: OperatorSpec, refs: Sequence[str]) -> list[str]:
    # Task-vector methods (and SLERP / Model Stock) treat the base as the origin, not as an input.
    if spec.needs_base or spec.space == "delta":
        return [ref for ref in refs if ref != recipe.base_model]
    return list(refs)


def plan_jobs(recipe: Recipe, spec: OperatorSpec, checkpoints: Mapping[str, Checkpoint]) -> list[TensorJob]:
    """Every output tensor of the merge, in the donor's tensor order."""
    if recipe.slices:
        return _plan_slices(recipe, spec, checkpoints)
    return _plan_models(recipe, spec, checkpoints)


def _map_name(recipe: Recipe, name: str, ref: str, donor_ref: str) -> str:
    """Name of the donor's tensor `name` in parent `ref` (sub-module merges map prefixes)."""
    if recipe.submodule is None or ref == donor_ref:
        return name
    return recipe.submodule.parent_prefix + name[len(recipe.submodule.prefix) :]


def _plan_models(recipe: Recipe, spec: OperatorSpec, checkpoints: Mapping[str, Checkpoint]) -> list[TensorJob]:
    entries = {entry.model: entry for entry in recipe.models}
    merged = _merged_refs(recipe, spec, [entry.model for entry in recipe.models])
    if not merged:
        raise ConfigError(f"method '{spec.name}' needs at least one model besides the base model")
    donor_ref = recipe.reference_ref()
    donor = checkpoints[donor_ref]
    prefix = recipe.submodule.prefix if recipe.submodule else ""
    rest_ref = donor_ref
    jobs: list[TensorJob] = []
    for name in donor.tensor_names():
        if not name.startswith(prefix):
            # Outside the merged sub-module (e.g. a vision tower): copied verbatim.
            jobs.append(TensorJob(name, (Source(rest_ref, name, ()),), None, 0.0, (), copy=True))
            continue
        role = tensor_role(name, donor.model_type)
        inputs = tuple(
            Source(ref, _map_name(recipe, name, ref, donor_ref), (entries[ref].parameters,)) for ref in merged
        )
        base = None
        if recipe.base_model:
            base = Source(recipe.base_model, _map_name(recipe, name, recipe.base_model, donor_ref), ())
        t = layer_position(role.layer, donor.num_layers)
        jobs.append(TensorJob(name, inputs, base, t, (recipe.parameters,)))
    return jobs


def _plan_slices(recipe: Recipe, spec: OperatorSpec, checkpoints: Mapping[str, Checkpoint]) -> list[TensorJob]:
    assert recipe.slices is not None
    for s_index, sl in enumerate(recipe.slices):
        for src in sl.sources:
            depth = checkpoints[src.model].num_layers
            if src.layer_range[1] > depth:
                raise ConfigError(
                    f"slices[{s_index}]: layer_range {list(src.layer_range)} of '{src.model}' exceeds its "
                    f"{depth} layers"
                )
    donor_ref = recipe.base_model or recipe.slices[0].sources[0].model
    donor = checkpoints[donor_ref]
    by_layer: dict[int, list[str]] = {}
    outer: list[str] = []
    for name in donor.tensor_names():
        role = tensor_role(name, donor.model_type)
        if role.layer is None:
            outer.append(name)
        else:
            by_layer.setdefault(role.layer, []).append(name)
    template = by_layer[min(by_layer)]

    def slice_inputs(sl_index: int, offset: int | None, out_name: str, t: float) -> TensorJob:
        sl = recipe.slices[sl_index]  # type: ignore[index]
        sources = []
        base = None
        for src in sl.sources:
            tensor = out_name if offset is None else with_layer(out_name, src.layer_range[0] + offset)
            source = Source(src.model, tensor, (src.parameters, sl.parameters))
            if src.model == recipe.base_model and (spec.needs_base or spec.space == "delta"):
                base = source
            else:
                sources.append(source)
        if base is None and recipe.base_model and (spec.needs_base or spec.space == "delta"):
            raise ConfigError(f"slices[{sl_index}] does not take any layers from the base model '{recipe.base_model}'")
        return TensorJob(out_name, tuple(sources), base, t, (sl.parameters, recipe.parameters))

    jobs: list[TensorJob] = []
    pre = [name for name in outer if tensor_role(name, donor.model_type).kind == "embedding"]
    post = [name for name in outer if name not in pre]
    # mergekit plans the tensors outside the layers at t = 0 (see `layer_position`).
    jobs += [slice_inputs(0, None, name, 0.0) for name in pre]
    out_layer = 0
    for s_index, sl in enumerate(recipe.slices):
        for offset in range(sl.num_layers):
            t = offset / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
            for name in template:
                jobs.append(slice_inputs(s_index, offset, with_layer(name, out_layer), t))
            out_layer += 1
    jobs += [slice_inputs(len(recipe.slices) - 1, None, name, 0.0) for name in post]
    return jobs


def output_num_layers(recipe: Recipe, donor: Checkpoint) -> int:
    """Depth of the merged model (slices stack layers; otherwise the donor's depth)."""
    if recipe.slices:
        return sum(sl.num_layers for sl in recipe.slices)
    return donor.num_layers


def _plain(value: ParamValue) -> Any:
    """Recipe values as the plain scalars / lists / mappings `resolve_param` reads."""
    if isinstance(value, list):
        return [item.model_dump() if isinstance(item, FilterRule) else item for item in value]
    return value


def _resolve(param: ParamSpec, layers: Sequence[Mapping[str, ParamValue]], job: TensorJob, ref: str | None) -> Any:
    # The most specific setting whose rules match this tensor wins; unmatched filter lists fall through.
    for parameters in layers:
        if param.name in parameters:
            number = resolve_param(_plain(parameters[param.name]), job.out_name, job.t)
            if number is not None:
                return bool(number) if param.is_flag else float(number)
    if param.required:
        owner = f" for model '{ref}'" if ref else ""
        raise ConfigError(f"parameter '{param.name}'{owner} is required but not given (tensor {job.out_name})")
    return param.default


def job_parameters(spec: OperatorSpec, job: TensorJob) -> dict[str, Any]:
    """The kernel's keyword arguments for one job: per-model lists and global scalars, resolved at t.

    Precedence (mergekit's): per-source-in-slice > per-slice > per-model > global > operator default.
    Copied tensors (outside a merged sub-module) take no parameters, so none can be missing there.
    """
    if job.copy:
        return {}
    resolved: dict[str, Any] = {}
    for param in spec.params:
        if param.per_model:
            resolved[param.name] = [
                _resolve(param, (*source.parameters, *job.global_parameters), job, source.ref)
                for source in job.inputs
            ]
        else:
            resolved[param.name] = _resolve(param, job.global_parameters, job, None)
    return resolved


class NonFiniteWeightsError(RuntimeError):
    """A candidate recipe produced NaN or Inf weights (recorded as a failed candidate, not a user error)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`. min and max propagate NaN and expose +-Inf, so one fused reduction
    answers it without the boolean tensor of ``isfinite(t).all()`` (bf16 CPU, 11.5M entries: 2 ms vs 42 ms)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def require_finite(tensor: torch.Tensor, out_name: str, error: type[Exception] = NonFiniteWeightsError) -> None:
    """Raise `error` naming the tensor when a merge produced NaN or Inf: the one rule of both merge paths."""
    if not all_finite(tensor):
        raise error(
            f"the merge produced non-finite values (NaN or Inf) in tensor {out_name}; "
            "check the recipe's parameters and the parents' weights"
        )


def apply_job(
    spec: OperatorSpec,
    base: torch.Tensor | None,
    inputs: torch.Tensor,
    parameters: Mapping[str, Any],
    *,
    seed: int,
    out_name: str,
    deltas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the operator on stacked inputs `[N, *shape]`; delta-space operators get task vectors.

    `deltas` may be passed precomputed (the in-memory merger keeps them resident); otherwise they are
    formed here as `inputs - base`.
    """
    generator = None
    if spec.is_random:
        generator = torch.Generator(device=inputs.device if deltas is None else deltas.device)
        generator.manual_seed(tensor_seed(seed, out_name))
    if spec.space == "delta":
        if base is None:
            raise ConfigError(f"method '{spec.name}' needs a base model (tensor {out_name})")
        if deltas is None:
            deltas = inputs - base
        return spec.kernel(base, deltas, generator=generator, **parameters)
    return spec.kernel(inputs, base, generator=generator, **parameters)
