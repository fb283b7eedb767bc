"""Sessions: everything one search process holds resident to evaluate candidates, behind one contract.

Two kinds implement `Session`: `SearchSession` (parameter space: recipes merged in memory into one live
model) and `dfs.DfsSession` (layer paths through resident source models). `SearchRun` — racing,
de-duplication, resume, workers, selection, test scoring — is written against `Session` only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from evomerge.errors import ConfigError
from evomerge.evaluate import (
    EvalReport,
    Evaluator,
    Task,
    TaskScore,
    load_causal_lm,
    resolve_device,
)
from evomerge.merge import (
    InMemoryMerger,
    NonFiniteWeightsError,
    Recipe,
    StreamingMerge,
    checkpoint_named_tensors,
    get_operator,
)
from evomerge.merge.recipe import ModelEntry, Submodule
from evomerge.merge.stream import DTYPES
from evomerge.models import Checkpoint
from evomerge.search.config import EvolveConfig, resolve_path, user_baselines
from evomerge.search.evidence import run_evidence
from evomerge.search.external import (
    LmEvalObjective,
    ObjectiveFunction,
    PythonObjective,
    open_objectives,
    python_scores,
)
from evomerge.search.genome import Gene, ParameterGenome, genome_key
from evomerge.search.objectives import Objectives
from evomerge.search.pool import SELECT, PoolScreen, screen_pool
from evomerge.search.store import TrialRecord, recipe_of


class Genome(Protocol):
    """A codec's view the search loop needs: the genes (Optuna distributions) and the CMA-ES start."""

    genes: tuple[Gene, ...]

    def __len__(self) -> int: ...

    @property
    def names(self) -> list[str]: ...

    def initial(self) -> dict[str, float]: ...


@runtime_checkable
class Session(Protocol):
    """What a search needs from the models it evaluates; the contract every kind of session keeps.

    A session holds one *live* model, `model`, which `evaluate` scores. Exactly one of the three
    `activate_*` calls decides what the live model is, and it stays so until the next one:

    - `activate_candidate(c)`: the candidate `c` (a value `decode` returned, or `candidate_of` read
      back); returns the seconds it took. A candidate that cannot be built (non-finite weights, an
      empty path) raises `ValueError` or `RuntimeError` and the caller records a failed candidate.
    - `activate_parent(ref)`: a parent as it is on disk; `ref` is one of `parents()`.
    - `activate_baseline(c)`: an untuned comparison; `c` is a value of `baselines()`.

    Evaluating twice without activating in between gives the same scores (nothing depends on the
    history of the live model), and activating the same candidate again reproduces its scores.

    Describing candidates:

    - `decode(genes)` is deterministic: equal genes give equal candidates (a seeded recipe, a path).
    - `describe(genes, c)` returns `(key, attributes)`: candidates with equal keys are the same
      candidate (the search evaluates one and copies its result to the others), and `attributes` are
      the run store's trial fields that record `c` (`recipe` or `path`).
    - `candidate_of(record)` is the inverse: the candidate a trial record describes, equal in effect to
      the one `describe` was given. `candidate_text(c)` is the text `attributes` holds.

    The run's inputs: `parents()` (refs, base first), `baselines()` (name -> candidate, stable order),
    `parent_genomes()` (name -> genes that reproduce a parent alone, where the genome can say so; used
    as warm starts) and `evidence()` (the `search.evidence.run_evidence` record of this session's inputs).
    """

    config: EvolveConfig
    device: torch.device
    objectives: Objectives
    genome: Genome
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module

    def sizes(self) -> dict[str, int]: ...

    def evaluate(self, split: str = "search", indices: Mapping[str, Sequence[int]] | None = None) -> EvalReport: ...

    def answer_probabilities(
        self, split: str, indices: Mapping[str, Sequence[int]], *, against_rival: bool = False,
        zero_if_lost: bool = False,
    ) -> EvalReport: ...

    def decode(self, genes: Mapping[str, float]) -> Any: ...

    def describe(self, genes: Mapping[str, float], candidate: Any) -> tuple[str, dict[str, str]]: ...

    def candidate_text(self, candidate: Any) -> str: ...

    def candidate_of(self, record: TrialRecord) -> Any: ...

    def parents(self) -> list[str]: ...

    def baselines(self) -> dict[str, Any]: ...

    def parent_genomes(self) -> dict[str, dict[str, float]]: ...

    def evidence(self) -> dict[str, Any]: ...

    def activate_candidate(self, candidate: Any) -> float: ...

    def activate_parent(self, ref: str) -> None: ...

    def activate_baseline(self, candidate: Any) -> None: ...


#: What a candidate (or an untuned baseline) may fail with and still let the search go on: weights that
#: overflow, a merge too large for the device, a path that cannot be built.
CANDIDATE_FAILURES = (NonFiniteWeightsError, torch.OutOfMemoryError, RuntimeError, ValueError)


def failure_reason(error: BaseException) -> str:
    """One line recording why a candidate failed."""
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


class SessionBase:
    """What every session shares: device, objectives, and one evaluator per split.

    Subclasses load their parents and set `tokenizer` and the live `model` that `evaluate` scores.
    """

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module

    def __init__(self, config: EvolveConfig, root: Path, objective_function: ObjectiveFunction | None = None):
        self.config = config
        self.root = root
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        if config.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        self.objectives = Objectives(
            tasks=open_objectives(config.objectives, root, objective_function, seed=config.seed,
                                  batch_size=config.batch_size),
            weights=[o.weight for o in config.objectives],
            directions=[o.direction for o in config.objectives],
            pareto=config.combine == "pareto",
        )
        self._evaluators: dict[str, Evaluator] = {}

    def evaluator(self, split: str) -> Evaluator:
        """The split's evaluator of the task files, built on first use (a search never builds the test one)."""
        if split not in self._evaluators:
            native = [task for task in self.objectives.tasks if isinstance(task, Task)]
            self._evaluators[split] = Evaluator(
                self.tokenizer, native, split, device=self.device, batch_size=self.config.batch_size
            )
        return self._evaluators[split]

    def answer_probabilities(
        self, split: str, indices: Mapping[str, Sequence[int]], *, against_rival: bool = False,
        zero_if_lost: bool = False,
    ) -> EvalReport:
        """The live model's teacher-forced probability of each chosen example's reference answer, or its
        race against the strongest rival token (`Evaluator.answer_probabilities`); task files only."""
        return self.evaluator(split).answer_probabilities(self.model, indices, against_rival=against_rival,
                                                                 zero_if_lost=zero_if_lost)

    def sizes(self) -> dict[str, int]:
        """Search-split size per task."""
        return {
            task.name: len(task.examples("search")) if isinstance(task, Task) else task.size("search")
            for task in self.objectives.tasks
        }

    def evaluate(self, split: str = "search", indices: Mapping[str, Sequence[int]] | None = None) -> EvalReport:
        """Score the live model on a split (optionally only `indices` per task; a task with none is skipped)."""
        started = time.perf_counter()
        tasks = [t for t in self.objectives.tasks if indices is None or indices.get(t.name)]
        scores: dict[str, TaskScore] = {}
        if any(isinstance(t, Task) for t in tasks):
            native = None if indices is None else {t.name: indices[t.name] for t in tasks if isinstance(t, Task)}
            scores.update(self.evaluator(split).evaluate(self.model, indices=native).scores)
        for task in tasks:
            if isinstance(task, LmEvalObjective):
                chosen = None if indices is None else indices[task.name]
                scores[task.name] = task.score(self.model, self.tokenizer, split, chosen)
        python = [t for t in tasks if isinstance(t, PythonObjective)]
        if python:
            scores.update(python_scores(python, self.model, self.tokenizer, split))
        ordered = {t.name: scores[t.name] for t in tasks}
        return EvalReport(split, ordered, time.perf_counter() - started)


class SearchSession(SessionBase):
    """Parameter-space search: parents resident in an in-memory merger, one live model overwritten per candidate."""

    def __init__(self, config: EvolveConfig, root: Path, objective_function: ObjectiveFunction | None = None):
        super().__init__(config, root, objective_function)
        self.base = resolve_path(config.base_model, root) if config.base_model else None
        self.pool_screen: PoolScreen | None = None
        if config.parents_pool:
            assert self.base is not None  # the config requires a base with a pool
            self.pool_screen = screen_pool(
                self.base, [resolve_path(ref, root) for ref in config.parents_pool],
                max_distance=config.pool_max_distance, allow_pickle=config.allow_pickle,
            )
            if not self.pool_screen.kept:
                raise ConfigError(f"evolve config: field 'parents_pool': the screen left no model ({self.pool_screen.rejected})")
        self.merged = self.pool_screen.kept if self.pool_screen else [resolve_path(ref, root) for ref in config.parents]
        self.submodule = _resolved_submodule(config.submodule, root)
        template = Recipe(
            method=config.method,
            base_model=self.base,
            models=[ModelEntry(model=ref) for ref in self.merged],
            parameters=dict(config.fixed),
            seed=config.seed,
            allow_pickle=config.allow_pickle,
            submodule=self.submodule,
        )
        self.merger = InMemoryMerger(template, device=self.device, dtype=self.dtype)
        self.reference = template.reference_ref()
        donor = self.merger.donor
        merged_models = [ref for ref in self.merged if ref != self.base]
        # With a sub-module only its tensors are genes (a VLM's vision tower and projector are copied).
        prefix = self.submodule.prefix if self.submodule else ""
        self.genome = ParameterGenome(
            self._with_paths(config), template.operator, merged_models,
            [name for name in donor.tensor_names() if name.startswith(prefix)], donor.model_type, donor.num_layers,
        )
        # A VLM comes with its processor, which the evaluator takes in place of the tokenizer.
        self.model, self.tokenizer = load_causal_lm(donor.path, device=self.device, dtype=self.dtype)

    def _with_paths(self, config: EvolveConfig) -> EvolveConfig:
        # Decoded recipes name parents by resolved path, so they work from any working directory.
        field = "parents_pool" if config.parents_pool else "parents"
        return config.model_copy(update={"base_model": self.base, field: self.merged, "submodule": self.submodule})

    # --- candidates -----------------------------------------------------------------------------
    def decode(self, genes: Mapping[str, float]) -> Recipe:
        """The recipe a genome stands for, seeded with the run's seed (DARE masks)."""
        return self.genome.decode(genes, seed=self.config.seed)

    def describe(self, genes: Mapping[str, float], recipe: Recipe) -> tuple[str, dict[str, str]]:
        """De-duplication by genome (values rounded), recorded as the recipe."""
        return genome_key(genes), {"recipe": self.candidate_text(recipe)}

    def candidate_text(self, recipe: Recipe) -> str:
        return recipe.to_yaml()

    def candidate_of(self, record: TrialRecord) -> Recipe:
        return recipe_of(record)

    def activate_candidate(self, recipe: Recipe) -> float:
        """Write a candidate into the live model; returns the merge seconds."""
        started = time.perf_counter()
        self.merger.merge_into(self.model, recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def activate_parent(self, ref: str) -> None:
        """Write a parent's own weights into the live model; in a sub-module search a parent other than
        the reference is its sub-module in the reference (an LLM's weights as a VLM's language tower)."""
        if self.submodule is not None and ref != self.reference:
            alone = Recipe(method="linear", models=[ModelEntry(model=ref, parameters={"weight": 1.0})],
                           submodule=self.submodule, allow_pickle=self.config.allow_pickle)
            self.activate_baseline(alone)
            return
        checkpoint = Checkpoint.open(ref, allow_pickle=self.config.allow_pickle)
        targets = checkpoint_named_tensors(self.model)
        with torch.no_grad():
            for name in checkpoint.tensor_names():
                targets[name].data.copy_(checkpoint.get(name, device=self.device, dtype=self.dtype))

    def activate_baseline(self, recipe: Recipe) -> None:
        """Write an untuned merge into the live model, one tensor at a time: a baseline's method may be
        of another family than the merger's (task arithmetic beside SLERP), so it is streamed."""
        targets = checkpoint_named_tensors(self.model)
        with torch.no_grad():
            for job, tensor in StreamingMerge(
                recipe, device=self.device, compute_dtype=self.dtype, allow_pickle=self.config.allow_pickle
            ):
                targets[job.out_name].data.copy_(tensor)

    # --- the run's inputs -----------------------------------------------------------------------
    def parents(self) -> list[str]:
        return ([self.base] if self.base else []) + self.genome.merged_models

    def baselines(self) -> dict[str, Recipe]:
        """Untuned merges every run is compared against, with the settings people actually use: task
        arithmetic at 1/N, TIES and DARE-TIES at mergekit's documented example density 0.5 with weight 0.5
        and weight 1 (with a base model), the run's own method the same way if it takes those parameters,
        and the config's own `baselines:`."""
        merged = self.genome.merged_models
        common = {"base_model": self.base, "seed": self.config.seed, "submodule": self.submodule}
        recipes: dict[str, Recipe] = {}

        def add(name: str, method: str, per_model: dict[str, float], shared: dict[str, Any] | None = None) -> None:
            recipes[name] = Recipe(
                method=method, models=[ModelEntry(model=m, parameters=dict(per_model)) for m in merged],
                parameters=shared or {}, **common,
            )

        if self.base:
            add("task_arithmetic_uniform", "task_arithmetic", {"weight": 1.0 / len(merged)})
            sparse = ["ties", "dare_ties"]
            own = get_operator(self.config.method).param_names()
            if self.config.method not in sparse and {"weight", "density"} <= set(own):
                sparse.append(self.config.method)
            for method in sparse:
                for weight in (0.5, 1.0):
                    add(f"{method}_density0.5_weight{weight:g}", method, {"weight": weight, "density": 0.5})
        if not recipes:  # no base model: the run's method with 1/N weights and mid-range required values
            spec = get_operator(self.config.method)
            required = {
                p.name: 1.0 / len(merged) if p.name == "weight" else sum(p.search_bounds()) / 2
                for p in spec.params if p.required
            }
            add(
                f"{self.config.method}_uniform", self.config.method,
                {n: v for n, v in required.items() if spec.param(n).per_model},
                {n: v for n, v in required.items() if not spec.param(n).per_model},
            )
        recipes.update(user_baselines(self.config, self.root))
        return recipes

    def parent_genomes(self) -> dict[str, dict[str, float]]:
        """Genomes of the parents alone (one task vector at full weight), where the genome can say so."""
        if "weight" not in self.config.genome:
            return {}
        genomes = {}
        for model in self.genome.merged_models:
            values = {("weight", m): (1.0 if m == model else 0.0) for m in self.genome.merged_models}
            values.update({(SELECT, m): (1.0 if m == model else 0.0) for m in self.genome.merged_models})
            values[("density", None)] = 1.0
            genomes[f"parent:{Path(model).name}"] = self.genome.encode_uniform(values)
        return genomes

    def evidence(self) -> dict[str, Any]:
        compat = self.merger.compat
        evidence = run_evidence(
            self.config, checkpoints=self.merger.checkpoints, base=self.base, compat_verdict=compat.verdict,
            compat_notes=compat.notes, tasks=self.objectives.tasks,
        )
        if self.pool_screen is not None:
            evidence["pool_screen"] = self.pool_screen.to_dict()
        return evidence


def _resolved_submodule(submodule: Submodule | None, root: Path) -> Submodule | None:
    if submodule is None or submodule.copy_rest_from is None:
        return submodule
    return submodule.model_copy(update={"copy_rest_from": resolve_path(submodule.copy_rest_from, root)})


def open_session(config: EvolveConfig, root: Path, objective_function: ObjectiveFunction | None = None) -> Session:
    """The session for the config's search space: merge recipes, or layer paths when `dfs` is set.

    `objective_function` scores the config's `python:KEY` objectives (`search.external`)."""
    if config.dfs is not None:
        from evomerge.search.dfs import DfsSession  # builds on this module

        return DfsSession(config, root, objective_function)
    return SearchSession(config, root, objective_function)
