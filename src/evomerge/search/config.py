"""The evolve config: parents, operator, genome, objectives, budget, optimizer — validated on load.

Every check that needs no model weights happens here, before any model is loaded: unknown operator
parameters, reversed bounds, objectives naming missing task files, a block size that does not divide
the number of layers (checked once the depth is known, still before weights are read).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Number, Recipe, Submodule, parse_recipe
from evomerge.merge.registry import get_operator
from evomerge.validation import validation_sentence

# per_layer_io: one group per layer, plus separate input-embedding and output (final norm + head) groups.
Granularity = Literal[
    "global", "per_layer", "per_layer_io", "per_block", "per_kind", "per_layer_kind", "per_block_kind"
]
Start = Literal["init", "best_baseline"]

#: `genome: paper` -- Sakana's parameter-space genome: a weight and a density per layer and per model, with
#: the input embeddings and the output head as groups of their own, every gene starting at 0.5.
PAPER_GENOME = {
    "weight": {"bounds": [0.0, 1.0], "granularity": "per_layer_io", "per_model": True, "init": 0.5},
    "density": {"bounds": [0.0, 1.0], "granularity": "per_layer_io", "per_model": True, "init": 0.5},
}
Optimizer = Literal["cmaes", "nsga2", "tpe", "gp", "random"]


class GeneSpec(BaseModel):
    """One free operator parameter: its bounds and how finely it varies across the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bounds: tuple[float, float] | None = None
    granularity: Granularity = "global"
    block_size: PositiveInt | None = None
    per_model: bool | None = None  # default: the operator's own declaration
    init: float | None = None  # the CMA-ES mean; default: the middle of the bounds (paper: 0.5)

    @model_validator(mode="after")
    def _consistent(self) -> GeneSpec:
        if self.bounds is not None:
            low, high = self.bounds
            if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                raise ValueError(f"bounds [{low}, {high}] must be finite with low < high")
            if self.init is not None and not low <= self.init <= high:
                raise ValueError(f"init {self.init} lies outside bounds [{low}, {high}]")
        if self.granularity in ("per_block", "per_block_kind") and self.block_size is None:
            raise ValueError(f"granularity '{self.granularity}' needs a block_size")
        if self.granularity not in ("per_block", "per_block_kind") and self.block_size is not None:
            raise ValueError(f"block_size is only used with per_block granularities, not '{self.granularity}'")
        return self


def direction_sign(direction: str) -> float:
    """+1 for "maximize", -1 for "minimize": `sign * score` is larger-is-better (the one place for it)."""
    return 1.0 if direction == "maximize" else -1.0


LM_EVAL_PREFIX = "lm_eval:"
PYTHON_PREFIX = "python:"
LM_EVAL_FIELDS = ("include_path", "search_split", "test_split", "split", "metric", "num_fewshot")


class Objective(BaseModel):
    """One task to optimise on its search split: an evomerge task file, `lm_eval:NAME` (an lm-eval task,
    with the fields below) or `python:KEY` (a key of the Python objective function's result)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str
    weight: float = 1.0
    direction: Literal["maximize", "minimize"] = "maximize"
    name: str | None = None
    include_path: str | None = Field(None, description="lm-eval: a directory of extra task YAMLs")
    search_split: str | None = Field(None, description="lm-eval: the split searched on (with test_split)")
    test_split: str | None = Field(None, description="lm-eval: the split the selected models are tested on")
    split: str | None = Field(None, description="lm-eval: one split, divided into search and test by a seeded shuffle")
    search_fraction: float = Field(0.5, gt=0, lt=1, description="lm-eval: the share of `split` searched on")
    metric: str | None = Field(None, description="lm-eval: the per-document metric (default: the task's first)")
    num_fewshot: int | None = Field(None, ge=0, description="lm-eval: few-shot examples (default: the task's)")

    @model_validator(mode="after")
    def _lm_eval_fields(self) -> Objective:
        given = [f for f in LM_EVAL_FIELDS if getattr(self, f) is not None]
        if given and not self.task.startswith(LM_EVAL_PREFIX):
            raise ValueError(f"{', '.join(given)} only apply to an lm-eval task (`task: {LM_EVAL_PREFIX}NAME`)")
        if (self.search_split is None) != (self.test_split is None):
            raise ValueError("give both search_split and test_split, or neither (then `split` is divided)")
        if self.search_split is not None and self.split is not None:
            raise ValueError("give search_split and test_split, or one `split` to divide, not both")
        if self.search_split is not None and self.search_split == self.test_split:
            raise ValueError(f"search_split and test_split are both {self.search_split!r}; test on other documents")
        return self

    @property
    def key(self) -> str:
        """An lm-eval or Python objective's name in score tables: `name`, else the lm-eval task or the key
        (a task file's objective is named by the file's own `name:`)."""
        return self.name or self.task.removeprefix(LM_EVAL_PREFIX).removeprefix(PYTHON_PREFIX)

    @property
    def sign(self) -> float:
        """+1 for a maximised objective, -1 for a minimised one (`direction_sign`)."""
        return direction_sign(self.direction)


class Budget(BaseModel):
    """When the search stops: after `candidates` evaluations or `wall_seconds`, whichever comes first."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    candidates: int = Field(100, ge=1, le=1_000_000)
    wall_seconds: float | None = Field(None, gt=0, le=30 * 24 * 3600)
    population: int | None = Field(None, ge=2, le=100_000)


class Racing(BaseModel):
    """Successive halving on the search split: score a slice first, continue only if still competitive."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    # 1/8 with growth 2: on the demo's CMA-ES stream the best saving whose told fitness keeps a Spearman
    # rank correlation >= 0.9 with the full-split fitness (benchmarks/RESULTS.md, racing). z = 2.2: with
    # three looks at a 300-example split, a candidate exactly at the threshold is wrongly dropped at most
    # 1.7% of the time over 10,000 simulated races (2.0 gave 3.6%; benchmarks/racing_drop_rate.py).
    first_fraction: float = Field(0.125, gt=0, lt=1, description="share of each task's search split in round one")
    growth: float = Field(2.0, gt=1, description="each round's cumulative share is the previous one times this")
    confidence: float = Field(2.2, gt=0, description="z-score of the optimistic bound used to drop a candidate")
    top_k: int | None = Field(None, ge=1, description="must still be able to enter this top; default: population")


class Fitness(BaseModel):
    """How a candidate's fitness is measured: the whole search split, or estimated from a few anchor examples.

    On large splits, graded anchor answers rank candidates better from the same anchors than greedy
    answers' 0/1 scores (benchmarks/RESULTS.md; on a 300-example split they did not), and cost one
    teacher-forced forward pass instead of a generation: `likelihood`, the probability the candidate
    gives the reference answer; `margin`, the product over the answer's tokens of p(token) / (p(token) +
    p(strongest other token)), a graded version of whether greedy decoding writes the reference. A search
    told `likelihood` estimates learns to raise the reference's probability, which is not the accuracy it
    is judged on; `margin` tracks greedy accuracy much more closely (benchmarks/RESULTS.md, fitness
    estimation). Both are biased low in absolute terms.

    `subset`: the accuracy on the anchors. `irt`: a 2PL item-response model fitted on every fully
    evaluated model (parents, untuned merges, the first `warmup` candidates, audited candidates) predicts
    the full-split accuracy from the anchor answers (`search.irt`). Estimated candidates are told to the
    optimizer with their estimate; the champion is chosen only among fully evaluated ones, so the top
    estimated candidates are audited (scored on the whole split) every `audit_every` candidates and at the end.

    The optimizer only uses how estimates rank, and for that `subset` on `margin` answers steered the search
    best (benchmarks/RESULTS.md, 300 candidates on a 1,800-example split): the IRT ability weights each
    anchor by its discrimination, which differs between the split's skills, and a search told it lost most
    on the skills weighted least.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    estimator: Literal["full", "subset", "irt"] = "full"
    examples: PositiveInt = Field(30, description="anchor examples per candidate, over all objectives' tasks")
    # Stratified by default, for the large splits estimation is for: with ~100 anchors from a few models'
    # answers, k-means centres land on rare answer patterns and the anchors stop representing the split
    # (benchmarks/anchor_choice.py, 90 of 1,800 examples: IRT Spearman 0.79 clustered, 0.91 stratified; with
    # 30 of 300 clustered ranked better, 0.73 against 0.67).
    anchors: Literal["stratified", "clustered"] = Field(
        "stratified", description="pick anchors by difficulty strata, or by k-means on the baselines' answers"
    )
    warmup: int = Field(0, ge=0, description="first candidates scored on the whole split (they join the IRT fit)")
    audit_every: PositiveInt | None = Field(
        None, description="every this many candidates, score the best estimated ones fully; default: only at the end"
    )
    audit_top_k: PositiveInt = Field(
        3, description="each audit scores those of the best this many estimates not yet scored on the whole split"
    )
    anchor_answers: Literal["generated", "likelihood", "margin", "margin_if_right"] = Field(
        "generated",
        description="how an estimated candidate answers its anchors: greedy answers scored by the task (0/1), "
        "the teacher-forced probability of the reference answer, or its tokens' race against their strongest "
        "rivals (graded, one forward pass; generative tasks)",
    )


class DfsConfig(BaseModel):
    """Data-flow-space search: layer paths through the sources (see `evomerge.flow`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[str] = Field(default_factory=list)
    repeats: PositiveInt = 3
    max_path_length: PositiveInt | None = None
    scale_bounds: tuple[float, float] = (0.5, 2.0)
    # full: one gene per W entry ((M + 1) x M); factorized: W_ij = a_i * b_j, 2M + 1 genes (large M).
    scaling: Literal["full", "factorized"] = "full"
    # A parameter-space run whose champion becomes model A (PS+DFS); exported into that run's directory.
    ps_run: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DfsConfig:
        low, high = self.scale_bounds
        if not 0 < low < high or not math.isfinite(high):
            raise ValueError(f"scale_bounds [{low}, {high}] must be finite with 0 < low < high")
        if len(self.sources) + (self.ps_run is not None) < 1:
            raise ValueError("give at least one entry in `sources` (or a `ps_run`)")
        return self


class EvolveConfig(BaseModel):
    """A whole evolutionary merge: what to merge, what is free, what counts, and how long to look."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "evolve"
    base_model: str | None = None
    parents: list[str] = Field(default_factory=list)
    parents_pool: list[str] = Field(
        default_factory=list, description="candidate parents: each candidate merges the ones its selection genes pick"
    )
    max_parents: PositiveInt | None = Field(None, description="most pool models one candidate merges")
    pool_max_distance: float = Field(
        0.5, gt=0, description="screen: a pool model farther from the base than this share of the base's norm is "
        "not a fine-tune of it and is left out"
    )
    method: str = "dare_ties"
    genome: dict[str, GeneSpec] = Field(default_factory=dict)
    start: Start = Field(
        "init", description="CMA-ES mean: every gene's `init` (the paper), or the best baseline the genome can express"
    )
    fixed: dict[str, Number | list[float]] = Field(default_factory=dict)
    baselines: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra untuned merges to compare against, as recipes of the run's parents"
    )
    dfs: DfsConfig | None = None
    submodule: Submodule | None = Field(
        None,
        description="evolve one sub-module, e.g. a VLM's language tower: {prefix: 'language_model.', parent_prefix: '', "
        "copy_rest_from: the VLM}; only its tensors are in the genome, the rest is copied from copy_rest_from",
    )
    objectives: list[Objective] = Field(min_length=1)
    combine: Literal["weighted", "pareto"] = "weighted"
    budget: Budget = Field(default_factory=Budget)
    optimizer: Optimizer | None = None
    sigma0: float = Field(1 / 6, gt=0, le=1, description="CMA-ES step size as a fraction of each gene's range")
    racing: Racing = Field(default_factory=Racing)
    fitness: Fitness = Field(default_factory=Fitness)
    seed: int = 0
    device: str = "cpu"
    cpu_threads: int | None = Field(
        None, ge=1, le=1024, description="torch threads on CPU; 1 is fastest for tiny models (less sync overhead)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    storage: str | None = None
    batch_size: int = Field(128, ge=1, le=65_536)
    intended_use: str = ""
    license: str | None = Field(
        None, description="the exported models' license (Hub id, e.g. apache-2.0); default: the one the parents' cards agree on"
    )
    allow_pickle: bool = False

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("genome") == "paper":
            return {**data, "genome": PAPER_GENOME}
        return data

    @model_validator(mode="after")
    def _shape(self) -> EvolveConfig:
        if self.parents and self.parents_pool:
            raise ValueError("give either `parents` or `parents_pool`, not both")
        if self.parents_pool and (self.dfs is not None or self.base_model is None):
            raise ValueError("`parents_pool` needs a `base_model` (the pool's common base) and no `dfs`")
        if self.max_parents is not None and not self.parents_pool:
            raise ValueError("`max_parents` limits a `parents_pool`; give one")
        if self.dfs is None and not (self.parents or self.parents_pool):
            raise ValueError("give `parents` (a parameter-space search) or `dfs` (a layer-path search)")
        if self.dfs is not None and self.submodule is not None:
            raise ValueError(
                "`dfs` cannot search a sub-module (layer paths run through plain causal LMs, not a VLM's "
                "language tower); drop `dfs` or `submodule`"
            )
        if self.dfs is None and not self.genome:
            raise ValueError("`genome` must name at least one free operator parameter")
        if self.combine == "pareto" and len(self.objectives) < 2:
            raise ValueError("`combine: pareto` needs at least two objectives")
        if self.combine == "pareto" and self.fitness.estimator != "full":
            raise ValueError("an estimated fitness predicts one weighted fitness; use `combine: weighted`")
        seen: dict[str, int] = {}
        for index, objective in enumerate(self.objectives):
            key = objective.name or objective.task
            if key in seen:
                raise ValueError(f"objectives[{index}] repeats objectives[{seen[key]}] ({key}); list each task once")
            seen[key] = index
        return self

    @property
    def merged_parents(self) -> list[str]:
        """The models a candidate may merge: `parents`, or the whole `parents_pool`."""
        return list(self.parents or self.parents_pool)

    @property
    def resolved_optimizer(self) -> Optimizer:
        """CMA-ES for one objective (or a weighted sum), NSGA-II for a Pareto search."""
        if self.optimizer is not None:
            return self.optimizer
        return "nsga2" if self.combine == "pareto" else "cmaes"


def _check_semantics(config: EvolveConfig, source: str, root: Path) -> None:
    if config.dfs is None:
        try:
            spec = get_operator(config.method)
        except ConfigError as error:
            raise ConfigError(f"{source}: field 'method': {error}") from None
        names = spec.param_names()
        for field, entries in (("genome", config.genome), ("fixed", config.fixed)):
            for name in entries:
                if name not in names:
                    hint = difflib.get_close_matches(name, names, n=1)
                    suggestion = f"; did you mean '{hint[0]}'?" if hint else f" (its parameters: {', '.join(names)})"
                    raise ConfigError(
                        f"{source}: {field}.{name} is not a parameter of method '{config.method}'{suggestion}"
                    )
        for param in spec.params:
            if param.required and param.name not in config.genome and param.name not in config.fixed:
                raise ConfigError(
                    f"{source}: parameter '{param.name}' of method '{config.method}' is required; "
                    "put it under `genome` or `fixed`"
                )
        for name, gene in config.genome.items():
            param = spec.param(name)
            if param.is_flag:
                raise ConfigError(f"{source}: genome.{name} is a true/false switch; set it under `fixed`")
            low, high = gene.bounds or param.search_bounds()
            if low < param.low or high > param.high:
                raise ConfigError(
                    f"{source}: genome.{name}.bounds [{low:g}, {high:g}] exceed the parameter's valid range "
                    f"[{param.low:g}, {param.high:g}]"
                )
            if gene.per_model and not param.per_model:
                raise ConfigError(f"{source}: genome.{name} is a global parameter and cannot vary per model")
    _check_baselines(config, source, root)
    if config.optimizer == "nsga2" and config.combine != "pareto":
        raise ConfigError(f"{source}: optimizer 'nsga2' needs `combine: pareto` and two or more objectives")
    if config.optimizer == "cmaes" and config.combine == "pareto":
        raise ConfigError(f"{source}: optimizer 'cmaes' optimises one objective; use 'nsga2' with `combine: pareto`")
    for index, objective in enumerate(config.objectives):
        if objective.task.startswith((LM_EVAL_PREFIX, PYTHON_PREFIX)):
            continue  # checked when the session opens them (lm-eval is an optional, slow import)
        path = resolve_path(objective.task, root)
        if not Path(path).is_file():
            raise ConfigError(f"{source}: objectives[{index}].task names {objective.task}, which does not exist")
    blocked = {name: gene for name, gene in config.genome.items() if gene.block_size is not None}
    if blocked and config.dfs is None:
        # The depth comes from config.json and the weight headers: no tensor is read yet. Imported here, as
        # only these configs need it: every other check runs without torch (`evomerge.lazy`).
        from evomerge.models import Checkpoint

        donor = Checkpoint.open(
            resolve_path(config.base_model or config.merged_parents[0], root), allow_pickle=config.allow_pickle
        )
        for name, gene in blocked.items():
            try:
                check_block_size(gene, donor.num_layers)
            except ConfigError as error:
                raise ConfigError(f"{source}: genome.{name}: {error}") from None


def check_block_size(gene: GeneSpec, num_layers: int) -> None:
    """Refuse a layer-block size that does not tile the model's depth."""
    if gene.block_size is not None and num_layers % gene.block_size != 0:
        raise ConfigError(f"block_size {gene.block_size} does not divide the model's {num_layers} layers")


def resolve_path(ref: str, root: Path) -> str:
    """A relative file or model path is taken relative to the config file's directory."""
    candidate = Path(ref).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    relative = root / candidate
    return str(relative) if relative.exists() or not candidate.exists() else str(candidate)


def user_baselines(config: EvolveConfig, root: Path, source: str = "evolve config") -> dict[str, Recipe]:
    """The config's `baselines:` as recipes, model paths resolved like the parents'."""
    recipes = {}
    for name, data in config.baselines.items():
        resolved = {**data}
        for key in ("base_model",):
            if isinstance(resolved.get(key), str):
                resolved[key] = resolve_path(resolved[key], root)
        if isinstance(resolved.get("models"), list):
            resolved["models"] = [
                {**entry, "model": resolve_path(entry["model"], root)}
                if isinstance(entry, dict) and isinstance(entry.get("model"), str) else entry
                for entry in resolved["models"]
            ]
        recipes[name] = parse_recipe(resolved, source=f"{source}: baselines.{name}")
    return recipes


def _check_baselines(config: EvolveConfig, source: str, root: Path) -> None:
    if config.baselines and config.dfs is not None:
        raise ConfigError(f"{source}: field 'baselines' takes recipes, which a layer-path (dfs) search cannot use")
    known = {resolve_path(ref, root) for ref in config.merged_parents}
    if config.base_model:
        known.add(resolve_path(config.base_model, root))
    for name, recipe in user_baselines(config, root, source).items():
        used = [entry.model for entry in recipe.models] + ([recipe.base_model] if recipe.base_model else [])
        stranger = next((ref for ref in used if ref not in known), None)
        if stranger is not None:
            raise ConfigError(
                f"{source}: baselines.{name} merges {stranger}, which is not one of the run's parents or its base_model"
            )


def load_evolve_config(path: str | Path) -> tuple[EvolveConfig, Path]:
    """Read and validate an evolve config; returns it with the directory relative paths start from."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"evolve config {path} does not exist") from None
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"evolve config {path} cannot be read") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"evolve config {path} is not valid YAML{where}") from None
    return parse_evolve_config(data, source=str(path), root=path.parent.resolve())


def parse_evolve_config(data: object, *, source: str, root: Path) -> tuple[EvolveConfig, Path]:
    """Validate an evolve config given as a mapping."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an evolve config must be a YAML mapping")
    try:
        config = EvolveConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(validation_sentence(error, source, EvolveConfig)) from None
    _check_semantics(config, source, root)
    return config, root
