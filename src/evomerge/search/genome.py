"""Parameter-space genome <-> merge recipe.

A genome is a flat vector of named genes. Each free operator parameter contributes one gene per
(model, tensor group), where the groups follow the configured granularity: the whole model, each layer,
each block of k layers, each block kind (attention / mlp / norm / embedding / head) or their products.
Decoding writes the genes as ordinary recipe parameters — `{filter, value}` rules on tensor names —
so a decoded candidate is a plain recipe that `evomerge merge` (and mergekit) reproduces exactly.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from evomerge.merge.recipe import ModelEntry, Recipe
from evomerge.merge.registry import OperatorSpec
from evomerge.models import tensor_role
from evomerge.search.config import EvolveConfig, GeneSpec, check_block_size
from evomerge.search.pool import SELECT, SELECTED_AT, selected

OUTSIDE = "outside"  # tensors outside the decoder layers (embeddings, final norm, lm_head)


@dataclass(frozen=True)
class Gene:
    """One coordinate of the genome."""

    name: str
    param: str
    model: str | None  # None: shared by all models (or a global parameter)
    group: str
    low: float
    high: float
    init: float


@dataclass(frozen=True)
class TensorGroups:
    """Which tensors each group label covers, in the donor's tensor order."""

    labels: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]


def group_tensors(names: Sequence[str], model_type: str | None, num_layers: int, gene: GeneSpec) -> TensorGroups:
    """Partition the donor's tensors into the gene's groups (raises ConfigError for a bad block size)."""
    check_block_size(gene, num_layers)
    members: dict[str, list[str]] = {}
    for name in names:
        role = tensor_role(name, model_type)
        members.setdefault(_label(gene, role.layer, role.kind), []).append(name)
    return TensorGroups(tuple(members), {label: tuple(group) for label, group in members.items()})


def _label(gene: GeneSpec, layer: int | None, kind: str) -> str:
    granularity = gene.granularity
    if granularity == "global":
        return "all"
    by_kind = granularity in ("per_kind", "per_layer_kind", "per_block_kind")
    if granularity == "per_kind":
        return kind
    if layer is None:
        if granularity == "per_layer_io":
            return "input" if kind == "embedding" else "output"
        return f"{OUTSIDE}.{kind}" if by_kind else OUTSIDE
    block = layer if gene.block_size is None else layer // gene.block_size
    prefix = f"layer{block}" if gene.block_size is None else f"block{block}"
    return f"{prefix}.{kind}" if by_kind else prefix


class ParameterGenome:
    """The codec for one evolve config and one donor architecture."""

    def __init__(
        self,
        config: EvolveConfig,
        spec: OperatorSpec,
        merged_models: Sequence[str],
        tensor_names: Sequence[str],
        model_type: str | None,
        num_layers: int,
    ):
        self.config = config
        self.spec = spec
        self.merged_models = list(merged_models)
        self.groups: dict[str, TensorGroups] = {}
        labels = model_labels(self.merged_models)
        genes: list[Gene] = []
        for param_name, gene_spec in config.genome.items():
            param = spec.param(param_name)
            groups = group_tensors(tensor_names, model_type, num_layers, gene_spec)
            self.groups[param_name] = groups
            low, high = gene_spec.bounds or param.search_bounds()
            init = gene_spec.init if gene_spec.init is not None else (low + high) / 2
            per_model = param.per_model if gene_spec.per_model is None else gene_spec.per_model
            models: list[str | None] = list(self.merged_models) if per_model else [None]
            for model in models:
                for label in groups.labels:
                    who = f"{labels[model]}." if model is not None else ""
                    genes.append(Gene(f"{param_name}.{who}{label}", param_name, model, label, low, high, init))
        # A pool: one selection gene per model, configured at the threshold; a run starts CMA-ES from the
        # parents that cover the most search-split answers instead (`baselines.pool_start`).
        self.max_parents = (config.max_parents or len(self.merged_models)) if config.parents_pool else None
        if self.max_parents is not None:
            for model in self.merged_models:
                genes.append(Gene(f"{SELECT}.{labels[model]}", SELECT, model, "all", 0.0, 1.0, SELECTED_AT))
        self.genes: tuple[Gene, ...] = tuple(genes)

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        return [gene.name for gene in self.genes]

    def decode(self, values: Mapping[str, float] | Sequence[float], *, seed: int) -> Recipe:
        """The recipe a genome stands for (values by gene name, or in gene order)."""
        if not isinstance(values, Mapping):
            values = dict(zip(self.names, values, strict=True))
        per_model: dict[str, dict[str, object]] = {model: {} for model in self.merged_models}
        shared: dict[str, object] = dict(self.config.fixed)
        for param_name in self.config.genome:
            param = self.spec.param(param_name)
            genes = [gene for gene in self.genes if gene.param == param_name]
            for model in {gene.model for gene in genes}:
                rules = self._rules(param_name, {g.group: float(values[g.name]) for g in genes if g.model == model})
                if model is None and param.per_model:
                    for entry in per_model.values():
                        entry[param_name] = rules
                elif model is None:
                    shared[param_name] = rules
                else:
                    per_model[model][param_name] = rules
        models = [ModelEntry(model=model, parameters=per_model[model]) for model in self.selected_models(values)]
        return Recipe(
            method=self.config.method,
            base_model=self.config.base_model,
            models=models,
            parameters=shared,
            seed=seed,
            name=self.config.name,
            submodule=self.config.submodule,
        )

    def selected_models(self, values: Mapping[str, float]) -> list[str]:
        """The parents a genome merges: all of them, or those its selection genes pick from a pool."""
        if self.max_parents is None:
            return list(self.merged_models)
        # By gene, not by composed name: a resumed study may keep the names it recorded (`adopt_recorded_names`).
        select = {gene.model: float(values[gene.name]) for gene in self.genes if gene.param == SELECT}
        genes = [select[model] for model in self.merged_models]
        return [self.merged_models[i] for i in selected(genes, self.max_parents)]

    def _rules(self, param_name: str, by_group: Mapping[str, float]) -> object:
        """A scalar when one group covers everything; otherwise `{filter, value}` rules per tensor group."""
        groups = self.groups[param_name]
        if len(groups.labels) == 1:
            return by_group[groups.labels[0]]
        rules: list[dict[str, object]] = []
        for label in groups.labels:
            for pattern in _patterns(groups.members[label], groups):
                rules.append({"filter": pattern, "value": by_group[label]})
        return rules

    def initial(self) -> dict[str, float]:
        """The configured start of every gene (`init`, default the middle of its bounds; the paper's 0.5)."""
        return {gene.name: gene.init for gene in self.genes}

    def encode_uniform(self, value_for: Mapping[tuple[str, str | None], float]) -> dict[str, float]:
        """A genome whose genes take one value per (parameter, model), clipped to the bounds.

        Used to place baselines (e.g. one parent alone) in the search space for warm starts.
        """
        encoded = {}
        for gene in self.genes:
            value = value_for.get((gene.param, gene.model), value_for.get((gene.param, None), gene.init))
            encoded[gene.name] = min(max(value, gene.low), gene.high)
        return encoded


def _patterns(members: Sequence[str], groups: TensorGroups) -> list[str]:
    """Filters that select exactly `members`: a layer's prefix where the group holds that whole layer,
    the full tensor name otherwise."""
    layer_sizes: dict[str, int] = {}
    for label in groups.labels:
        for name in groups.members[label]:
            prefix = tensor_role(name).prefix
            if prefix is not None:
                layer_sizes[prefix] = layer_sizes.get(prefix, 0) + 1
    by_prefix: dict[str | None, list[str]] = {}
    for name in members:
        by_prefix.setdefault(tensor_role(name).prefix, []).append(name)
    patterns: list[str] = []
    for prefix, names in by_prefix.items():
        if prefix is not None and len(names) == layer_sizes[prefix]:
            patterns.append(prefix)
        else:
            patterns.extend(names)
    return patterns


def model_labels(models: Sequence[str]) -> dict[str, str]:
    """A short, stable, unique label per parent inside gene names: the last part of its path or hub id
    (`math`, so genes read `weight.math.layer0`), with characters other than letters, digits, `_` and
    `-` replaced by `_` (a dot would split the gene name), and `_2`, `_3`, ... appended to a repeat."""
    labels: dict[str, str] = {}
    for index, model in enumerate(models):
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", PurePosixPath(model.replace("\\", "/").rstrip("/")).name) or f"m{index}"
        label, n = stem, 1
        while label in labels.values():
            n += 1
            label = f"{stem}_{n}"
        labels[model] = label
    return labels


def adopt_recorded_names(genes: Sequence[Gene], recorded: Sequence[Mapping[str, object]]) -> tuple[Gene, ...]:
    """The genes under the names a study recorded when it started, matched by position, parameter and group.

    A run started before gene names carried parent names (`weight.m0.layer0`) keeps its names on resume:
    its trials, re-queued genomes and the CMA-ES state all refer to them. A record of another genome
    (other parameters or groups) leaves the names as they are.
    """
    if len(recorded) != len(genes) or any(
        record.get("param") != gene.param or record.get("group") != gene.group for record, gene in zip(recorded, genes)
    ):
        return tuple(genes)
    return tuple(replace(gene, name=str(record["name"])) for gene, record in zip(genes, recorded))


def genome_key(values: Mapping[str, float], digits: int = 6) -> str:
    """Identity of a genome for de-duplication (values rounded to `digits` significant digits)."""
    text = ";".join(f"{name}={_round(value, digits)}" for name, value in sorted(values.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _round(value: float, digits: int) -> str:
    if value == 0 or not math.isfinite(value):
        return repr(value)
    return f"{value:.{digits}g}"
