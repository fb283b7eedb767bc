"""The streaming merge behind `evomerge merge`: one output tensor in memory at a time.

Order of work: open every parent lazily (headers only) → check compatibility → plan every tensor and
resolve every parameter (so a bad recipe fails before the first tensor is read) → merge tensor by tensor
into a `CheckpointWriter`, which only renames its temporary directory into place once complete.
Reading the next job's tensors overlaps with merging the current one (one thread of read-ahead).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ExportError
from evomerge.merge.card import MERGEKIT_CONFIG, CardInfo, render_model_card, resolve_license
from evomerge.merge.chat_template import (
    TEMPLATE_FILE,
    is_template_file,
    resolve_chat_template,
    without_chat_template,
)
from evomerge.merge.plan import (
    Source,
    TensorJob,
    apply_job,
    job_parameters,
    output_num_layers,
    plan_jobs,
    require_finite,
)
from evomerge.merge.recipe import Recipe
from evomerge.merge.registry import OperatorSpec
from evomerge.merge.union import UNION, UnionVocabulary, union_vocabulary
from evomerge.models import (
    Checkpoint,
    CheckpointWriter,
    CompatReport,
    align_rows,
    check_compatible,
    refuse_remote_code,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The writer holds a whole shard in memory until it is full, so the shard size is the output's share of the
# merge's peak memory; 256 MiB shards measured 1.1 GiB lower peak RSS than 2 GB ones on a 271M-parameter
# float32 merge (benchmarks/RESULTS.md), and no slower: writes start early instead of all at the end.
MERGE_SHARD_BYTES = 256 * 2**20
# Files a merged checkpoint takes from its donor; weights and their index are written anew.
DONOR_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    # An image-text model's processor (a merged VLM's language tower keeps the reference's processor).
    "processor_config.json",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class MergeResult:
    """What a finished merge produced."""

    out_dir: Path
    num_tensors: int
    seconds: float
    compat: CompatReport


def open_parents(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Open every parent the recipe names (headers only), in the recipe's deterministic order."""
    allow = allow_pickle or recipe.allow_pickle
    checkpoints = {ref: Checkpoint.open(ref, allow_pickle=allow) for ref in recipe.parent_refs()}
    for checkpoint in checkpoints.values():
        refuse_remote_code(checkpoint)  # its config (auto_map included) could become the merged model's
    return checkpoints


def check_parents(recipe: Recipe, checkpoints: Mapping[str, Checkpoint]) -> CompatReport:
    """Compatibility of the parents, before any tensor is merged (raises CompatibilityError).

    Layer-stacking recipes may combine parents of different depths: their names cannot match, so
    only parents of the reference's depth take part in the tensor-by-tensor check.
    """
    copy_rest = recipe.submodule.copy_rest_from if recipe.submodule else None
    merged = list(checkpoints.values())
    base = checkpoints.get(recipe.base_model) if recipe.base_model else None
    if copy_rest is not None:
        # The reference (whose names the merge has) goes first and the base is checked like a parent:
        # it carries the merged tensors under `parent_prefix`, as the other parents do.
        merged = [checkpoints[copy_rest], *(ckpt for ref, ckpt in checkpoints.items() if ref != copy_rest)]
        base = None
    if recipe.slices is not None:
        depth = (base or merged[0]).num_layers
        merged = [ckpt for ckpt in merged if ckpt.num_layers == depth]
    union = recipe.tokenizer_source == UNION
    tokenizer_source = checkpoints[recipe.donor_ref()] if recipe.tokenizer_source and not union else None
    prefix_map = None
    if recipe.submodule is not None:
        prefix_map = {recipe.submodule.prefix: recipe.submodule.parent_prefix}
    return check_compatible(merged, base=base, tokenizer_source=tokenizer_source, prefix_map=prefix_map, union=union)


def _load_inputs(
    job: TensorJob,
    *,
    checkpoints: Mapping[str, Checkpoint],
    compat: CompatReport,
    tokenizer_donor: Checkpoint,
    device: str | torch.device,
    dtype: torch.dtype,
    buffer: _ReusedBuffer | None,
    union: UnionVocabulary | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    aligned: dict[Path, torch.Tensor] = {}
    if union is not None and job.out_name in compat.vocabulary_tensors:
        # Re-indexed to the union's ids together: a parent's missing rows come from the others' rows.
        sources = [*job.inputs, *([job.base] if job.base is not None else [])]
        aligned = union.align({
            checkpoints[s.ref].path: checkpoints[s.ref].get(s.tensor, device=device, dtype=dtype) for s in sources
        })

    def load(source: Source) -> torch.Tensor:
        if aligned:
            return aligned[checkpoints[source.ref].path]
        tensor = checkpoints[source.ref].get(source.tensor, device=device, dtype=dtype)
        for alignment in compat.row_alignments:
            # Parents with another vocabulary size: rows follow the tokenizer donor (see check_compatible).
            if alignment.tensor == job.out_name and alignment.model == checkpoints[source.ref].path:
                filler = tokenizer_donor.get(job.out_name, device=device, dtype=dtype)
                return align_rows(tensor, alignment.target_rows, filler)
        return tensor

    # Fill one preallocated [N, *shape] buffer instead of `torch.stack` over a list: the list would hold
    # every input twice at the peak (a 32k x 1024 embedding is 131 MB per parent in float32).
    first = load(job.inputs[0])
    shape = (len(job.inputs), *first.shape)
    stacked = first.new_empty(shape) if buffer is None else buffer.take(shape, first.dtype, first.device)
    stacked[0].copy_(first)
    del first
    for index, source in enumerate(job.inputs[1:], start=1):
        stacked[index].copy_(load(source))
    for source in job.inputs:
        checkpoints[source.ref].release(source.tensor)
    base = load(job.base) if job.base is not None else None
    return base, stacked


class _ReusedBuffer:
    """Memory for one job's stacked inputs, kept from job to job instead of allocated afresh.

    Freshly allocated memory is page-faulted in and zeroed by the kernel on first touch, and for a linear
    merge (no arithmetic to speak of) those faults were most of the time: 3 x 271M float32 parameters
    took 830k faults with a new buffer per job, 480k with two reused ones (benchmarks/RESULTS.md). The
    buffer grows to the largest job seen; nothing that leaves the merge may point into it.
    """

    def __init__(self) -> None:
        self._storage: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        storage = self._storage
        if storage is None or storage.numel() < count or storage.dtype != dtype or storage.device != device:
            storage = self._storage = torch.empty(count, dtype=dtype, device=device)
        return storage[:count].view(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` shares this buffer's memory (a view the caller must copy out)."""
        return self._storage is not None and tensor.untyped_storage().data_ptr() == (
            self._storage.untyped_storage().data_ptr()
        )


class StreamingMerge:
    """A planned merge whose tensors are produced one at a time by iterating over it.

    Opening it reads headers only, checks compatibility and resolves every parameter; iterating yields
    `(job, merged tensor)` while the next job's inputs are read on a second thread.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ):
        self.recipe = recipe
        self.spec: OperatorSpec = recipe.operator
        self.device = device
        self.compute_dtype = compute_dtype
        self.checkpoints = open_parents(recipe, allow_pickle=allow_pickle)
        self.compat = check_parents(recipe, self.checkpoints)
        self.union: UnionVocabulary | None = None
        if recipe.tokenizer_source == UNION:
            self.union = union_vocabulary([self.checkpoints[ref] for ref in recipe.parent_refs()])
            self.compat = replace(self.compat, config_updates={**self.compat.config_updates, "vocab_size": self.union.size})
        self.jobs = plan_jobs(recipe, self.spec, self.checkpoints)
        self.parameters = [job_parameters(self.spec, job) for job in self.jobs]

    @property
    def donor(self) -> Checkpoint:
        return self.checkpoints[self.recipe.donor_ref()]

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[tuple[TensorJob, torch.Tensor]]:
        # The tokenizer donor is one of the opened parents (rows are only aligned with a tokenizer_source).
        load = partial(
            _load_inputs, checkpoints=self.checkpoints, compat=self.compat, tokenizer_donor=self.donor,
            device=self.device, dtype=self.compute_dtype, union=self.union,
        )
        # Two buffers take turns: job i is merged from one while job i + 1 is read into the other, which
        # job i - 1 no longer needs (its result was copied out of it, if it pointed into it). Copied
        # tensors leave the merge as they are read, so they get memory of their own.
        buffers = (_ReusedBuffer(), _ReusedBuffer())

        def read(index: int) -> tuple[torch.Tensor | None, torch.Tensor]:
            job = self.jobs[index]
            return load(job, buffer=None if job.copy else buffers[index % 2])

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-read") as reader:
            pending: Future | None = None
            for index, job in enumerate(self.jobs):
                base, stacked = pending.result() if pending is not None else read(index)
                if index + 1 < len(self.jobs):
                    pending = reader.submit(read, index + 1)
                if job.copy:
                    merged = stacked[0]
                else:
                    merged = apply_job(
                        self.spec, base, stacked, self.parameters[index], seed=self.recipe.seed,
                        out_name=job.out_name,
                    )
                    if buffers[index % 2].holds(merged):  # e.g. passthrough returns its input
                        merged = merged.clone()
                    if job.base is not None:
                        self.checkpoints[job.base.ref].release(job.base.tensor)
                yield job, merged


def merged_config(recipe: Recipe, donor: Checkpoint, compat: CompatReport) -> dict[str, Any]:
    """The donor's config, with the depth of a layer-stacked merge, the vocabulary and the output dtype."""
    config = {**donor.config, **compat.config_updates}
    depth = output_num_layers(recipe, donor)
    if depth != donor.num_layers:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in config:
                config[key] = depth
        # Per-layer lists (e.g. Qwen2's / Gemma's layer_types) must follow the new depth.
        for key, value in list(config.items()):
            if isinstance(value, list) and len(value) == donor.num_layers and key.startswith("layer"):
                config[key] = [value[i % len(value)] for i in range(depth)]
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        config["torch_dtype"] = out_dtype
        config["dtype"] = out_dtype
    return config


def refuse_overlaps(out_dir: str | Path, parents: Sequence[Path], keep: Sequence[Path] = ()) -> None:
    """Refuse an output that is, contains or lies inside a parent, or contains the current directory or a
    `keep` file: writing it (with --overwrite, replacing it) would destroy the merge's own inputs."""
    target = Path(out_dir).resolve()
    for parent in parents:
        source = parent.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise ExportError(f"output directory {out_dir} overlaps the parent model {parent}; choose another --out")
    for path, what in [(Path.cwd(), "the current directory"), *((Path(p), str(p)) for p in keep)]:
        if target == path.resolve() or target in path.resolve().parents:
            raise ExportError(f"output directory {out_dir} contains {what}, which writing it would delete; choose another --out")


def merge_files(recipe: Recipe, merge: StreamingMerge, name: str, *, card: bool = True) -> dict[str, str]:
    """The text files a merge writes besides weights and config: mergekit YAML, chat template, model card.

    The card names the model `recipe.name`, else `name`. A template given as a file is inlined into the
    mergekit YAML, which takes only names and Jinja text.
    """
    files: dict[str, str] = dict(merge.union.files) if merge.union is not None else {}
    parent_dirs = {ref: Path(merge.checkpoints[ref].path) for ref in recipe.parent_refs()}
    mergekit_recipe = recipe
    if recipe.chat_template is not None:
        template = resolve_chat_template(recipe.chat_template, list(parent_dirs.values()))
        if template is not None:
            files[TEMPLATE_FILE] = template
            donor_config = merge.donor.path / "tokenizer_config.json"
            if "tokenizer_config.json" in files:  # the union tokenizer's
                files["tokenizer_config.json"] = without_chat_template(files["tokenizer_config.json"])
            elif donor_config.is_file():
                files["tokenizer_config.json"] = without_chat_template(donor_config.read_text(encoding="utf-8"))
            if is_template_file(recipe.chat_template):
                mergekit_recipe = recipe.model_copy(update={"chat_template": template})
    mergekit_yaml = mergekit_recipe.to_mergekit_yaml()
    if mergekit_yaml is not None:
        files[MERGEKIT_CONFIG] = mergekit_yaml
    if not card:
        return files
    license_ = resolve_license(parent_dirs, recipe.license, required=False, field_name="the recipe's `license`")
    files["README.md"] = render_model_card(CardInfo(
        name=recipe.name or name, method=recipe.method, parents=recipe.parent_refs(),
        base_model=recipe.base_model, recipe_yaml=recipe.to_yaml(), license=license_,
        mergekit_config=mergekit_yaml is not None,
    ))
    return files


def run_merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    allow_pickle: bool = False,
    extra_files: Mapping[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    max_shard_bytes: int = MERGE_SHARD_BYTES,
    keep: Sequence[Path] = (),
) -> MergeResult:
    """Merge `recipe` into `out_dir` (sharded safetensors, config, tokenizer, `recipe.yaml`, mergekit YAML,
    `chat_template.jinja`, model card `README.md`; `extra_files` add to or replace them).

    `keep` names files the output must not replace (the recipe file the CLI read). Parents whose cards
    declare different licenses are refused (`ConfigError`) unless the recipe sets `license`.
    """
    started = time.perf_counter()
    merge = StreamingMerge(recipe, device=device, compute_dtype=compute_dtype, allow_pickle=allow_pickle)
    refuse_overlaps(out_dir, [Path(c.path) for c in merge.checkpoints.values()], keep)
    # Before any tensor is merged: a license conflict or a missing template file fails fast.
    files = {**merge_files(recipe, merge, Path(out_dir).name, card="README.md" not in (extra_files or {})), **(extra_files or {})}
    if on_plan is not None:
        on_plan(len(merge))
    donor, compat = merge.donor, merge.compat
    out_dtype = DTYPES.get(recipe.out_dtype or recipe.dtype or "", None)
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for job, tensor in merge:
            if not job.copy:  # a NaN/Inf parent or parameter (`weight: .inf`) must not become a model
                require_finite(tensor, job.out_name, ExportError)
            # Without an explicit dtype the output keeps the dtype of the tensor it was made from.
            first = job.inputs[0]
            target = out_dtype or merge.checkpoints[first.ref].dtype(first.tensor)
            # Merged tensors are fresh and copied ones are views of a per-job buffer: no defensive copy.
            writer.add(job.out_name, tensor.to(dtype=target, device="cpu"), copy=False)
            if on_tensor is not None:
                on_tensor(job.out_name)
        writer.copy_files(donor.path, [name for name in DONOR_FILES if (donor.path / name).exists()])
        writer.write_text("config.json", json.dumps(merged_config(recipe, donor, compat), indent=2, sort_keys=True))
        writer.write_text("recipe.yaml", recipe.to_yaml())
        for relpath, text in files.items():
            writer.write_text(relpath, text)
    return MergeResult(Path(out_dir), len(merge), time.perf_counter() - started, compat)

