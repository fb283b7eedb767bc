"""Data-flow-space (DFS) search: the genome codec over layer paths and the session that evaluates them.

The genome follows Sakana's DFS: one indicator gene per slot of the layout "all source layers in order,
repeated r times" (gene > 0 = the slot is on the path, in slot order) and scaling genes for the matrix W
(`evomerge.flow` convention: M + 1 rows, the last one for embedding -> first step). `scaling: full`
searches every W entry; `scaling: factorized` searches W_ij = a_i * b_j (one "from" factor per source
layer plus the embedding, one "to" factor per layer), 2M + 1 genes instead of (M + 1) M for large M.

`DfsSession` keeps the `session.Session` contract, so racing, de-duplication, resume, workers,
selection and test scoring are shared with the parameter-space search. A decoded
candidate is a `PathCandidate`; candidates are de-duplicated by their *path* (many indicator vectors
decode to the same path), and a path that is empty or longer than `max_path_length` is a failed
candidate with its reason, not an error of the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from evomerge.errors import CompatibilityError, ConfigError, ModelError
from evomerge.evaluate import load_causal_lm
from evomerge.flow import (
    MAX_PATH_STEPS,
    PathModel,
    PathSpec,
    check_path_sources,
    initial_genome,
    path_from_genome,
    slot_layout,
)
from evomerge.models import LINEAGE_FILE, Checkpoint, CompatReport
from evomerge.search.config import DfsConfig, EvolveConfig, resolve_path
from evomerge.search.evidence import run_evidence
from evomerge.search.external import ObjectiveFunction
from evomerge.search.genome import Gene
from evomerge.search.session import SessionBase
from evomerge.search.store import PS_CHAMPION_DIR, TrialRecord, load_run

#: Indicator genes live in [-1, 1]; the initial path (`flow.initial_genome`) has them at +-sigma0 * 2.
INDICATOR_BOUNDS = (-1.0, 1.0)


class InvalidPathError(ValueError):
    """A candidate genome decodes to no usable path (empty, or longer than the configured limit).

    A `ValueError`, so `SearchRun.step` records the candidate as failed with this reason.
    """


@dataclass(frozen=True)
class PathCandidate:
    """A decoded DFS genome: a path, or the reason it is not one."""

    spec: PathSpec | None
    failure: str | None = None

    @property
    def key(self) -> str:
        """De-duplication identity: the path's steps and scales (6 significant digits), or the failure."""
        text = self.failure if self.spec is None else json.dumps(_rounded(self.spec.to_dict()), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """What a trial stores under `path`: the spec (`PathSpec.to_dict`) or the failure."""
        return json.dumps({"path": self.spec.to_dict() if self.spec else None, "failure": self.failure})

    @classmethod
    def from_json(cls, text: str) -> PathCandidate:
        """Inverse of `to_json`."""
        data = json.loads(text)
        spec = PathSpec.from_dict(data["path"]) if data["path"] is not None else None
        return cls(spec=spec, failure=data["failure"])


def _rounded(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "scales": [float(f"{w:.6g}") for w in data["scales"]], "source_names": []}


class DfsGenome:
    """Codec between a flat gene vector and a `PathCandidate`, for one source layout."""

    def __init__(
        self, dfs: DfsConfig, layers_per_source: Sequence[int], source_names: Sequence[str], *, sigma0: float
    ):
        self.layers_per_source = tuple(layers_per_source)
        self.source_names = tuple(source_names)
        self.repeats = dfs.repeats
        self.scaling = dfs.scaling
        self.max_steps = dfs.max_path_length or MAX_PATH_STEPS
        self.slots = slot_layout(self.layers_per_source, self.repeats)
        self.num_layers = sum(self.layers_per_source)
        start = initial_genome(self.layers_per_source, self.repeats)
        # On/off at one CMA-ES step from the threshold 0, not on the bounds: from +-1 a flip took a 3-sigma
        # move and only 1.7% of indicator samples flipped, so paths hardly left model A's layers.
        margin = sigma0 * (INDICATOR_BOUNDS[1] - INDICATOR_BOUNDS[0])
        genes = [
            Gene(f"on.{t:03d}.s{s}l{l}", "indicator", None, f"slot{t}", *INDICATOR_BOUNDS, margin * float(start.indicator[t]))
            for t, (s, l) in enumerate(self.slots)
        ]
        genes += self._scale_genes(dfs.scale_bounds)
        self.genes: tuple[Gene, ...] = tuple(genes)

    def _scale_genes(self, bounds: tuple[float, float]) -> list[Gene]:
        m = self.num_layers
        low, high = bounds
        if self.scaling == "full":
            return [
                Gene(f"w.{_row(i, m)}.{j}", "scale", None, f"{_row(i, m)}->{j}", low, high, _clip(1.0, low, high))
                for i in range(m + 1)
                for j in range(m)
            ]
        # Each factor in [sqrt(low), sqrt(high)] keeps every product a_i * b_j inside [low, high].
        f_low, f_high = math.sqrt(low), math.sqrt(high)
        init = _clip(1.0, f_low, f_high)
        rows = [Gene(f"a.{_row(i, m)}", "scale_from", None, _row(i, m), f_low, f_high, init) for i in range(m + 1)]
        cols = [Gene(f"b.{j}", "scale_to", None, str(j), f_low, f_high, init) for j in range(m)]
        return rows + cols

    def __len__(self) -> int:
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        """Gene names in genome order."""
        return [gene.name for gene in self.genes]

    def matrices(self, values: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """The indicator vector (T,) and scaling matrix (M + 1, M) a genome stands for."""
        m = self.num_layers
        indicator = np.array([values[gene.name] for gene in self.genes[: len(self.slots)]], dtype=np.float64)
        rest = np.array([values[gene.name] for gene in self.genes[len(self.slots) :]], dtype=np.float64)
        scales = rest.reshape(m + 1, m) if self.scaling == "full" else np.outer(rest[: m + 1], rest[m + 1 :])
        return indicator, scales

    def decode(self, values: Mapping[str, float] | Sequence[float]) -> PathCandidate:
        """The path a genome stands for (deterministic); an empty or too long path is a `PathCandidate`
        with a failure."""
        if not isinstance(values, Mapping):
            values = dict(zip(self.names, values, strict=True))
        indicator, scales = self.matrices(values)
        length = int((indicator > 0).sum())
        if length == 0:
            return PathCandidate(None, "the indicator genes switch every slot off, so the path is empty")
        if length > self.max_steps:
            return PathCandidate(None, f"the path has {length} steps, more than max_path_length {self.max_steps}")
        spec = path_from_genome(
            indicator, scales, self.layers_per_source, self.repeats,
            source_names=self.source_names, max_steps=self.max_steps,
        )
        return PathCandidate(spec)

    def initial(self) -> dict[str, float]:
        """The paper's starting genome: model A's layers on once, every scale 1 (clipped to the bounds)."""
        return {gene.name: gene.init for gene in self.genes}

    @property
    def merged_models(self) -> list[str]:
        """The sources (what the session evaluates as parent baselines)."""
        return list(self.source_names)


def _row(i: int, m: int) -> str:
    return "emb" if i == m else str(i)


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def ps_champion_source(ps_run: str | Path) -> Path:
    """The exported champion of a parameter-space run (`<ps_run>/dfs_model_a`), model A of a PS+DFS run.

    The export is made by `pipelines.evolve` before the search starts (exporting is a release step
    above the search); here it must exist and be the run's current champion, else `ConfigError`.
    """
    run_dir = Path(ps_run)
    config, store = load_run(run_dir)
    if config.dfs is not None:
        raise ConfigError(f"dfs.ps_run {run_dir} is a layer-path run; it must be a parameter-space run")
    selection = store.selection
    if selection is None:
        raise ConfigError(f"dfs.ps_run {run_dir} has no champion yet; let that evolve finish first")
    out = run_dir / PS_CHAMPION_DIR
    if not (out / LINEAGE_FILE).is_file():
        raise ConfigError(f"{out} does not hold the champion of {run_dir} yet; `evomerge evolve` exports it")
    exported = json.loads((out / LINEAGE_FILE).read_text())["run"]["trial"]
    if exported != selection["champion"]:
        raise ConfigError(
            f"{out} holds candidate {exported} but the champion of {run_dir} is candidate "
            f"{selection['champion']}; delete {out} to export the new champion"
        )
    return out


def resolve_sources(dfs: DfsConfig, root: Path) -> list[str]:
    """Source directories in path order: the `ps_run` champion first (model A), then `sources`."""
    sources = [resolve_path(ref, root) for ref in dfs.sources]
    if dfs.ps_run is not None:
        sources.insert(0, str(ps_champion_source(resolve_path(dfs.ps_run, root))))
    return sources


def source_configs(sources: Sequence[str]) -> list[PretrainedConfig]:
    """Each source's config (no weights read); a missing or unreadable one raises `ModelError`."""
    configs = []
    for source in sources:
        try:
            configs.append(AutoConfig.from_pretrained(source))
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot read the config of DFS source {source}: {' '.join(str(error).split())}") from None
    return configs


def check_dfs_sources(dfs: DfsConfig, sources: Sequence[str], configs: Sequence[PretrainedConfig]) -> None:
    """Everything that can be refused before weights load: architecture, shared shapes, tokenizer, limits."""
    layers = [config.num_hidden_layers for config in configs]
    # The initial path (model A's layers) is the CMA-ES mean; it must itself be a valid candidate.
    start = PathSpec(tuple(layers), tuple((0, l) for l in range(layers[0])), (1.0,) * layers[0])
    check_path_sources(configs, start)
    limit = dfs.max_path_length
    if limit is not None and limit > MAX_PATH_STEPS:
        raise ConfigError(f"dfs.max_path_length {limit} exceeds the largest supported path of {MAX_PATH_STEPS} steps")
    if limit is not None and limit < layers[0]:
        raise ConfigError(
            f"dfs.max_path_length {limit} is shorter than model A's {layers[0]} layers, the search's starting path"
        )
    fingerprints = {source: Checkpoint.open(source).tokenizer_fingerprint() for source in sources}
    first = fingerprints[sources[0]]
    for source, fingerprint in fingerprints.items():
        if fingerprint != first:
            raise CompatibilityError(
                f"DFS source {source} has a different tokenizer than model A ({sources[0]}); a path reads "
                "model A's embeddings, so all sources must share one vocabulary"
            )


class DfsSession(SessionBase):
    """Everything a layer-path candidate evaluation needs, loaded once: the sources and the tasks.

    Keeps the `Session` contract. `model` is what `evaluate` scores: a `PathModel` over the resident
    sources (built per candidate; no weights are copied) or, for parent baselines, a source model itself.
    """

    def __init__(self, config: EvolveConfig, root: Path, objective_function: ObjectiveFunction | None = None):
        assert config.dfs is not None
        self.sources = resolve_sources(config.dfs, root)
        configs = source_configs(self.sources)
        check_dfs_sources(config.dfs, self.sources, configs)
        super().__init__(config, root, objective_function)
        layers = [c.num_hidden_layers for c in configs]
        self.genome = DfsGenome(config.dfs, layers, self.sources, sigma0=config.sigma0)
        loaded = [load_causal_lm(s, device=self.device, dtype=self.dtype, allow_pickle=config.allow_pickle) for s in self.sources]
        self.source_models: list[PreTrainedModel] = [model for model, _ in loaded]
        self.tokenizer = loaded[0][1]
        self.checkpoints = {s: Checkpoint.open(s, allow_pickle=config.allow_pickle) for s in self.sources}
        self.compat = _path_compat(self.sources, configs, self.checkpoints)
        self.model: torch.nn.Module = self.source_models[0]

    # --- candidates -----------------------------------------------------------------------------
    def decode(self, genes: Mapping[str, float]) -> PathCandidate:
        return self.genome.decode(genes)

    def describe(self, genes: Mapping[str, float], candidate: PathCandidate) -> tuple[str, dict[str, str]]:
        """De-duplication by path, not by genes (many indicator vectors decode to one path)."""
        return candidate.key, {"path": self.candidate_text(candidate)}

    def candidate_text(self, candidate: PathCandidate) -> str:
        return candidate.to_json()

    def candidate_of(self, record: TrialRecord) -> PathCandidate:
        assert record.path is not None
        return PathCandidate.from_json(record.path)

    def activate_candidate(self, candidate: PathCandidate) -> float:
        """Make `candidate`'s path the live model; returns the seconds taken (no weights move)."""
        if candidate.spec is None:
            raise InvalidPathError(candidate.failure)
        started = time.perf_counter()
        self.model = PathModel(self.source_models, candidate.spec)
        return time.perf_counter() - started

    def activate_parent(self, ref: str) -> None:
        """Make a source model itself the live model."""
        self.model = self.source_models[self.sources.index(ref)]

    def activate_baseline(self, candidate: PathCandidate) -> None:
        """Baselines are paths too: the live model becomes the baseline's path."""
        self.activate_candidate(candidate)

    # --- the run's inputs -----------------------------------------------------------------------
    def parents(self) -> list[str]:
        return self.genome.merged_models

    def baselines(self) -> dict[str, PathCandidate]:
        """Untuned paths: every source's layers stacked once at scale 1 (the frankenmerge), if within the limit."""
        steps = tuple((s, l) for s, n in enumerate(self.genome.layers_per_source) for l in range(n))
        if len(steps) > self.genome.max_steps:
            return {}
        spec = PathSpec(self.genome.layers_per_source, steps, (1.0,) * len(steps), self.genome.source_names)
        return {"stack_all_layers": PathCandidate(spec)}

    def parent_genomes(self) -> dict[str, dict[str, float]]:
        """Empty: a path genome has no setting that reproduces a source other than model A."""
        return {}

    def evidence(self) -> dict[str, Any]:
        return run_evidence(
            self.config, checkpoints=self.checkpoints, base=None, compat_verdict=self.compat.verdict,
            compat_notes=self.compat.notes, tasks=self.objectives.tasks,
        )


def _path_compat(sources: Sequence[str], configs: Sequence[PretrainedConfig],
                 checkpoints: Mapping[str, Checkpoint]) -> CompatReport:
    # What run evidence records about layer-path sources, in the shape of a merge's compatibility report.
    first = checkpoints[sources[0]]
    return CompatReport(
        architecture=first.architecture,
        model_type=first.model_type,
        num_layers=sum(c.num_hidden_layers for c in configs),
        tensor_names=(),
        tokenizer_fingerprints={s: c.tokenizer_fingerprint() for s, c in checkpoints.items()},
        config_donor=Path(sources[0]),
        tokenizer_donor=Path(sources[0]),
        row_alignments=(),
        config_updates={},
        notes=("layer-path sources: shared shapes and tokenizer checked; model A gives embeddings and head",),
        verdict=f"compatible for layer paths: {len(sources)} source(s), one tokenizer",
    )
