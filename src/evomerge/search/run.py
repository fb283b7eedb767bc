"""The evolutionary search loop: Optuna ask/tell over decoded recipes, evaluated in memory.

One run is one Optuna study in the run directory's SQLite database (or any database URL). Every
candidate's evidence — its decoded recipe, scores with standard errors, examples used, merge and
evaluation seconds, memory, status and failure reason — is stored on its trial, so the study *is* the
run's history: killing the process loses at most the candidate in flight, which is re-queued on resume.
"""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from transformers import PreTrainedTokenizerBase

from evomerge.errors import ConfigError
from evomerge.evaluate import (
    EvalReport,
    Evaluator,
    Task,
    TaskScore,
    load_causal_lm,
    load_task,
    mean_and_stderr,
)
from evomerge.merge.inmemory import InMemoryMerger, NonFiniteWeightsError
from evomerge.merge.recipe import ModelEntry, Recipe, parse_recipe
from evomerge.merge.registry import get_operator
from evomerge.merge.stream import DTYPES, StreamingMerge
from evomerge.models import Checkpoint
from evomerge.search.config import EvolveConfig, resolve_path
from evomerge.search.genome import ParameterGenome, genome_key
from evomerge.search.racing import entry_threshold, plan_race, race
from evomerge.search.samplers import make_sampler, population_size

optuna.logging.set_verbosity(optuna.logging.WARNING)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class CandidateResult:
    """What one candidate evaluation produced (also what the live display shows)."""

    number: int
    generation: int
    status: str  # complete | raced_out | duplicate | failed
    fitness: float | None
    values: tuple[float, ...]
    scores: dict[str, dict[str, float]]
    examples: int
    examples_saved: int
    merge_seconds: float
    eval_seconds: float
    failure: str | None = None


@dataclass
class Objectives:
    """Tasks with weights and directions; turns per-task scores into the fitness (or fitness vector)."""

    tasks: list[Task]
    weights: list[float]
    directions: list[str]
    pareto: bool

    @property
    def signed_weights(self) -> list[tuple[str, float]]:
        """(task name, weight) per objective, the weight negated for a minimised one."""
        return [
            (task.name, weight * (1.0 if direction == "maximize" else -1.0))
            for task, weight, direction in zip(self.tasks, self.weights, self.directions, strict=True)
        ]

    def fitness(self, scores: Mapping[str, float]) -> float:
        """Weighted sum, with minimised objectives negated, so larger is always better."""
        total = 0.0
        for name, weight in self.signed_weights:
            total += weight * scores[name]
        return total

    def values(self, scores: Mapping[str, float]) -> tuple[float, ...]:
        """What Optuna is told: the fitness, or one value per objective for a Pareto search."""
        if self.pareto:
            return tuple(scores[task.name] for task in self.tasks)
        return (self.fitness(scores),)

    @property
    def study_directions(self) -> list[str]:
        return list(self.directions) if self.pareto else ["maximize"]


def storage_url(config: EvolveConfig, run_dir: Path) -> str:
    """The study's database: the configured URL, else SQLite inside the run directory."""
    return config.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def prepare_run_dir(config: EvolveConfig, run_dir: Path) -> None:
    """Create the run directory with a frozen copy of its config; refuse to resume a different config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run_dir / CONFIG_FILE
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    if frozen.exists():
        if yaml.safe_load(frozen.read_text()) != yaml.safe_load(text):
            raise ConfigError(
                f"run directory {run_dir} holds a different config; resume with the same config or pick a new --run"
            )
        return
    frozen.write_text(text)


class SessionBase:
    """What every search session shares: device, objectives, and one evaluator per split.

    Subclasses load their parents and set `tokenizer` and the live `model` that `evaluate` scores.
    """

    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module

    def __init__(self, config: EvolveConfig, root: Path):
        self.config = config
        self.root = root
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        if config.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        self.objectives = Objectives(
            tasks=[load_task(resolve_path(o.task, root)) for o in config.objectives],
            weights=[o.weight for o in config.objectives],
            directions=[o.direction for o in config.objectives],
            pareto=config.combine == "pareto",
        )
        self._evaluators: dict[str, Evaluator] = {}

    def evaluator(self, split: str) -> Evaluator:
        """The split's evaluator, built on first use (a search never builds the test one)."""
        if split not in self._evaluators:
            self._evaluators[split] = Evaluator(
                self.tokenizer, self.objectives.tasks, split, device=self.device, batch_size=self.config.batch_size
            )
        return self._evaluators[split]

    def sizes(self) -> dict[str, int]:
        """Search-split size per task."""
        return {task.name: len(task.examples("search")) for task in self.objectives.tasks}

    def evaluate(self, split: str = "search", indices: Mapping[str, Sequence[int]] | None = None) -> EvalReport:
        """Score the live model on a split (optionally only `indices` per task)."""
        return self.evaluator(split).evaluate(self.model, indices=indices)


class SearchSession(SessionBase):
    """Parameter-space search: parents resident in an in-memory merger, one live model overwritten per candidate."""

    def __init__(self, config: EvolveConfig, root: Path):
        super().__init__(config, root)
        self.parents = [resolve_path(ref, root) for ref in config.parents]
        self.base = resolve_path(config.base_model, root) if config.base_model else None
        template = Recipe(
            method=config.method,
            base_model=self.base,
            models=[ModelEntry(model=ref) for ref in self.parents],
            parameters=dict(config.fixed),
            seed=config.seed,
            allow_pickle=config.allow_pickle,
        )
        self.merger = InMemoryMerger(template, device=self.device, dtype=self.dtype)
        donor = self.merger.donor
        merged_models = [ref for ref in self.parents if ref != self.base]
        self.genome = ParameterGenome(
            self._with_paths(config), template.operator, merged_models, donor.tensor_names(),
            donor.model_type, donor.num_layers,
        )
        self.model, self.tokenizer = load_causal_lm(donor.path, device=self.device, dtype=self.dtype)

    def _with_paths(self, config: EvolveConfig) -> EvolveConfig:
        # Decoded recipes name parents by resolved path, so they work from any working directory.
        return config.model_copy(update={"base_model": self.base, "parents": self.parents})

    def load_recipe(self, recipe: Recipe) -> float:
        """Write a candidate into the live model; returns the merge seconds."""
        started = time.perf_counter()
        self.merger.merge_into(self.model, recipe)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def load_checkpoint(self, ref: str) -> None:
        """Write a parent's own weights into the live model (for parent baselines)."""
        checkpoint = Checkpoint.open(ref, allow_pickle=self.config.allow_pickle)
        targets = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in checkpoint.tensor_names():
                targets[name].data.copy_(checkpoint.get(name, device=self.device, dtype=self.dtype))

    def load_streamed(self, recipe: Recipe) -> None:
        """Write a recipe of another family (a baseline) into the live model, one tensor at a time."""
        targets = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for job, tensor in StreamingMerge(recipe, device=self.device, compute_dtype=self.dtype):
                targets[job.out_name].data.copy_(tensor)

    def describe(self, genes: Mapping[str, float], recipe: Recipe) -> tuple[str, dict[str, Any]]:
        """A candidate's de-duplication key and the trial attributes that record what it is."""
        return genome_key(genes), {"recipe": recipe.to_yaml()}

    def candidate_of(self, trial: optuna.trial.FrozenTrial) -> Recipe:
        """The candidate a trial recorded (inverse of `describe`)."""
        return recipe_of(trial)


def open_session(config: EvolveConfig, root: Path) -> SearchSession:
    """The session for the config's search space: merge recipes, or layer paths when `dfs` is set."""
    if config.dfs is not None:
        from evomerge.search.dfs import DfsSession  # builds on this module

        return DfsSession(config, root)
    return SearchSession(config, root)


def combine_scores(first: TaskScore, rest: TaskScore) -> TaskScore:
    """One task's score over the union of two disjoint example sets."""
    values = first.values + rest.values
    score, stderr = mean_and_stderr(values)
    return TaskScore(
        task=first.task, score=score, stderr=stderr, n=len(values), values=values,
        indices=first.indices + rest.indices, prompt_tokens=first.prompt_tokens + rest.prompt_tokens,
        generated_tokens=first.generated_tokens + rest.generated_tokens, seconds=first.seconds + rest.seconds,
    )


def score_table(scores: Mapping[str, TaskScore]) -> dict[str, dict[str, float]]:
    """JSON-ready per-task score, standard error and example count."""
    return {
        name: {"score": s.score, "stderr": s.stderr if math.isfinite(s.stderr) else None, "n": s.n, "tokens": s.tokens}
        for name, s in scores.items()
    }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class SearchRun:
    """Drives one study: resume bookkeeping, baselines, the ask/tell loop, racing, de-duplication."""

    config: EvolveConfig
    root: Path
    run_dir: Path
    on_candidate: Callable[[CandidateResult], None] | None = None
    on_status: Callable[[str], None] | None = None
    session: SearchSession = field(init=False)
    study: optuna.Study = field(init=False)

    def __post_init__(self) -> None:
        self.session = open_session(self.config, self.root)
        self.genome = self.session.genome
        self.popsize = population_size(self.config, len(self.genome))
        racing = self.config.racing
        self.race = plan_race(self.session.sizes(), racing.first_fraction, self.config.seed, racing.growth)
        self.top_k = self.config.racing.top_k or self.popsize
        self.distributions = {
            gene.name: optuna.distributions.FloatDistribution(gene.low, gene.high) for gene in self.genome.genes
        }

    # --- study ----------------------------------------------------------------------------------
    def open_study(self, x0: Mapping[str, float] | None) -> optuna.Study:
        sampler = make_sampler(self.config, num_genes=len(self.genome), x0=x0)
        self.study = optuna.create_study(
            study_name=self.config.name,
            storage=storage_url(self.config, self.run_dir),
            sampler=sampler,
            directions=self.session.objectives.study_directions,
            load_if_exists=True,
        )
        return self.study

    def requeue_interrupted(self) -> int:
        """Trials left RUNNING by a killed process: mark failed and queue their genomes again."""
        interrupted = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for trial in interrupted:
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
        return len(interrupted)

    def finished_trials(self) -> list[optuna.trial.FrozenTrial]:
        """Trials that count against the budget (interrupted ones were re-queued and do not)."""
        trials = self.study.get_trials(deepcopy=False)
        requeued = {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
        # Trials a worker's heartbeat declared dead were re-queued by Optuna's retry callback.
        requeued.update(n for t in trials for n in t.system_attrs.get("retry_history", ()))
        done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
        return [t for t in trials if t.state in done and t.number not in requeued]

    # --- baselines ------------------------------------------------------------------------------
    def baseline_recipes(self) -> dict[str, Recipe]:
        """Untuned merges every run is compared against (parents alone are evaluated separately)."""
        if self.config.dfs is not None:
            return self.session.baselines()
        merged = self.genome.merged_models
        uniform = 1.0 / len(merged)
        common = {"base_model": self.session.base, "seed": self.config.seed}
        methods = ["task_arithmetic", "ties", self.config.method] if self.session.base else [self.config.method]
        recipes = {}
        for method in dict.fromkeys(methods):  # ordered, without repeats
            spec = get_operator(method)
            # Parameters without a default get the untuned values people reach for: 1/N weights, mid-range.
            required = {p.name: uniform if p.name == "weight" else sum(p.search_bounds()) / 2 for p in spec.params if p.required}
            per_model = {name: value for name, value in required.items() if spec.param(name).per_model}
            shared = {name: value for name, value in required.items() if not spec.param(name).per_model}
            name = "task_arithmetic_uniform" if method == "task_arithmetic" else f"{method}_defaults"
            recipes[name] = Recipe(
                method=method,
                models=[ModelEntry(model=m, parameters=dict(per_model)) for m in merged],
                parameters=shared,
                **common,
            )
        return recipes

    def expressible_baselines(self) -> dict[str, dict[str, float]]:
        """Genomes of the parents alone (one task vector at full weight), where the genome can say so."""
        if "weight" not in self.config.genome:
            return {}
        genomes = {}
        for model in self.genome.merged_models:
            values = {("weight", m): (1.0 if m == model else 0.0) for m in self.genome.merged_models}
            values[("density", None)] = 1.0
            genomes[f"parent:{Path(model).name}"] = self.genome.encode_uniform(values)
        return genomes

    def evaluate_baselines(self) -> dict[str, Any]:
        """Search-split scores of the parents and untuned merges, stored on the study (once per run)."""
        stored = self.study.user_attrs.get("baselines")
        if stored is not None:
            return stored
        baselines: dict[str, Any] = {}
        parents = ([self.session.base] if self.session.base else []) + self.genome.merged_models
        for ref in parents:
            self._status(f"baseline: parent {Path(ref).name}")
            self.session.load_checkpoint(ref)
            report = self.session.evaluate("search")
            baselines[f"parent:{Path(ref).name}"] = self._baseline_record(report, "parent", ref=ref)
        for name, recipe in self.baseline_recipes().items():
            self._status(f"baseline: {name}")
            self.session.load_streamed(recipe)
            report = self.session.evaluate("search")
            baselines[name] = self._baseline_record(report, "untuned", recipe=recipe)
        for name, genome in self.expressible_baselines().items():
            baselines[name]["genome"] = genome
        self.study.set_user_attr("baselines", baselines)
        return baselines

    def _baseline_record(self, report: EvalReport, kind: str, *, ref: str | None = None, recipe: Recipe | None = None):
        scores = {name: s.score for name, s in report.scores.items()}
        return {
            "kind": kind,
            "ref": ref,
            "recipe": recipe.to_yaml() if recipe else None,
            "search": score_table(report.scores),
            "fitness": self.session.objectives.fitness(scores),
        }

    def warm_start(self, baselines: Mapping[str, Any]) -> dict[str, float] | None:
        """The CMA-ES mean: the best baseline the genome can express, else the genome's initial values."""
        expressible = {name: b for name, b in baselines.items() if "genome" in b}
        if not expressible:
            return self.genome.initial()
        best = max(expressible.values(), key=lambda b: b["fitness"])
        return best["genome"]

    # --- candidates -----------------------------------------------------------------------------
    def _status(self, message: str) -> None:
        if self.on_status is not None:
            self.on_status(message)

    def known_genomes(self) -> dict[str, optuna.trial.FrozenTrial]:
        known = {}
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            key = trial.user_attrs.get("genome_key")
            if key and trial.user_attrs.get("status") == "complete":
                known.setdefault(key, trial)
        return known

    def full_fitnesses(self) -> list[float]:
        return [
            t.user_attrs["fitness"]
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("status") == "complete"
        ]

    def run(self) -> optuna.Study:
        """Run (or resume) the search until the budget is spent."""
        self.open_study(x0=None)
        self.requeue_interrupted()
        self.record_evidence()
        baselines = self.evaluate_baselines()
        x0 = self.warm_start(baselines)
        if x0 is not None and self.config.resolved_optimizer == "cmaes":
            self.open_study(x0=x0)
        self.study.set_user_attr("genes", [gene.__dict__ for gene in self.genome.genes])
        self.study.set_user_attr("population", self.popsize)
        started = time.monotonic()
        budget = self.config.budget
        while len(self.finished_trials()) < budget.candidates:
            if budget.wall_seconds is not None and time.monotonic() - started > budget.wall_seconds:
                break
            result = self.step()
            if self.on_candidate is not None:
                self.on_candidate(result)
        return self.study

    def record_evidence(self) -> None:
        """Store what this run is made of (parents by content, compatibility, task suite) on the study."""
        from evomerge.lineage.store import record_run_evidence  # lineage reads runs, so import lazily

        session = self.session
        record_run_evidence(
            self.study, self.config, checkpoints=session.merger.checkpoints, base=session.base,
            compat_verdict=session.merger.compat.verdict, compat_notes=session.merger.compat.notes,
            tasks=session.objectives.tasks, device=str(session.device),
        )

    def ask(self) -> optuna.Trial:
        """A new trial with every gene suggested (workers override this to start its heartbeat)."""
        return self.study.ask(self.distributions)

    def find_duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        """An earlier trial with the same genome, whose result this one copies instead of re-evaluating."""
        return self.known_genomes().get(key)

    def step(self) -> CandidateResult:
        """Ask for one candidate, evaluate it (with racing) and tell the study."""
        trial = self.ask()
        generation = trial.number // self.popsize
        genes = {name: trial.params[name] for name in self.genome.names}
        recipe = self.genome.decode(genes, seed=self.config.seed)
        key, record = self.session.describe(genes, recipe)
        trial.set_user_attr("generation", generation)
        trial.set_user_attr("genome_key", key)
        for name, value in record.items():
            trial.set_user_attr(name, value)
        duplicate = self.find_duplicate(trial, key)
        if duplicate is not None:
            return self._tell_duplicate(trial, generation, duplicate)
        try:
            merge_seconds = self.session.load_recipe(recipe)
            return self._evaluate_candidate(trial, generation, merge_seconds)
        except (NonFiniteWeightsError, torch.OutOfMemoryError, RuntimeError, ValueError) as error:
            reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("failure", reason)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if self.device_is_cuda:
                torch.cuda.empty_cache()
            return CandidateResult(trial.number, generation, "failed", None, (), {}, 0, 0, 0.0, 0.0, reason)

    @property
    def device_is_cuda(self) -> bool:
        return self.session.device.type == "cuda"

    def _tell_duplicate(self, trial: optuna.Trial, generation: int, original: optuna.trial.FrozenTrial):
        for name in ("scores", "fitness", "examples"):
            trial.set_user_attr(name, original.user_attrs.get(name))
        trial.set_user_attr("status", "duplicate")
        trial.set_user_attr("duplicate_of", original.number)
        if original.state == optuna.trial.TrialState.FAIL:  # e.g. a NaN recipe another worker already tried
            trial.set_user_attr("failure", original.user_attrs.get("failure"))
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return CandidateResult(
                trial.number, generation, "duplicate", None, (), {}, 0, 0, 0.0, 0.0, original.user_attrs.get("failure")
            )
        self.study.tell(trial, original.values)
        return CandidateResult(
            trial.number, generation, "duplicate", original.user_attrs.get("fitness"), tuple(original.values),
            original.user_attrs.get("scores", {}), 0, 0, 0.0, 0.0,
        )

    def _evaluate_candidate(self, trial: optuna.Trial, generation: int, merge_seconds: float) -> CandidateResult:
        objectives = self.session.objectives
        racing = self.config.racing.enabled and not objectives.pareto
        started = time.perf_counter()
        total_examples = sum(self.session.sizes().values())
        if racing:
            scores: dict[str, TaskScore] = {}

            def score_round(indices: dict[str, list[int]]) -> dict[str, list[float]]:
                for name, score in self.session.evaluate("search", indices).scores.items():
                    scores[name] = combine_scores(scores[name], score) if name in scores else score
                return {name: score.values for name, score in scores.items()}

            threshold = entry_threshold(self.full_fitnesses(), self.top_k)
            raced_out = race(self.race, score_round, dict(objectives.signed_weights), threshold,
                             self.config.racing.confidence)
            status = "raced_out" if raced_out else "complete"
        else:
            scores = dict(self.session.evaluate("search").scores)
            status = "complete"
        eval_seconds = time.perf_counter() - started
        plain = {name: s.score for name, s in scores.items()}
        fitness = objectives.fitness(plain)
        if not math.isfinite(fitness):  # e.g. weights that overflow in the forward pass: a failed candidate
            raise ValueError(f"the candidate's fitness is {fitness} (non-finite scores: {plain})")
        examples = sum(s.n for s in scores.values())
        table = score_table(scores)
        attrs = {
            "status": status,
            "scores": table,
            "fitness": fitness,
            "split": "search",
            "examples": examples,
            "examples_saved": total_examples - examples,
            "merge_seconds": merge_seconds,
            "eval_seconds": eval_seconds,
            "tokens": sum(s.tokens for s in scores.values()),
            "peak_memory_bytes": peak_memory_bytes(self.session.device),
            "device": str(self.session.device),
        }
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        values = objectives.values(plain)
        self.study.tell(trial, list(values))
        return CandidateResult(
            trial.number, generation, status, fitness, values, table, examples, total_examples - examples,
            merge_seconds, eval_seconds,
        )


def recipe_of(trial: optuna.trial.FrozenTrial) -> Recipe:
    """The decoded recipe a trial stored."""
    return parse_recipe(yaml.safe_load(trial.user_attrs["recipe"]), source=f"trial {trial.number}")


def write_run_file(run_dir: Path, data: Mapping[str, Any]) -> None:
    """Atomically replace the run's JSON summary."""
    tmp = run_dir / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(run_dir / RUN_FILE)


def load_run(run_dir: str | Path) -> tuple[EvolveConfig, optuna.Study]:
    """The frozen config and the study of an existing run directory."""
    run_dir = Path(run_dir)
    frozen = run_dir / CONFIG_FILE
    if not frozen.is_file():
        raise ConfigError(f"{run_dir} is not an evomerge run directory (no {CONFIG_FILE})")
    config = EvolveConfig.model_validate(yaml.safe_load(frozen.read_text()))
    try:
        study = optuna.load_study(study_name=config.name, storage=storage_url(config, run_dir))
    except KeyError:
        raise ConfigError(f"run directory {run_dir} has no study named '{config.name}' yet") from None
    return config, study


def find_trial(study: optuna.Study, candidate: str) -> optuna.trial.FrozenTrial:
    """A trial by number, or the run's selected champion (`champion`)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if candidate == "champion":
        selection = study.user_attrs.get("selection")
        if selection is None:
            raise ConfigError("the run has no champion yet; let the evolve finish or name a candidate number")
        return trials[selection["champion"]]
    if not candidate.isdigit() or int(candidate) not in trials:
        raise ConfigError(f"candidate '{candidate}' is not a trial number of this run (0..{len(trials) - 1})")
    trial = trials[int(candidate)]
    if "recipe" not in trial.user_attrs and "path" not in trial.user_attrs:
        raise ConfigError(f"candidate {candidate} has no recipe recorded")
    return trial
