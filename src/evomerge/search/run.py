"""The evolutionary search loop: Optuna ask/tell over decoded candidates, evaluated in memory.

One run is one Optuna study in the run directory's SQLite database (or any database URL). Every
candidate's evidence — its decoded recipe, scores with standard errors, examples used, merge and
evaluation seconds, memory, status and failure reason — is stored on its trial (`search.store`), so the
study *is* the run's history: killing the process loses at most the candidate in flight, which is
re-queued on resume.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import sqlalchemy
import torch

from evomerge.errors import ConfigError
from evomerge.evaluate import TaskScore
from evomerge.search import store as runs
from evomerge.search.baselines import evaluate_baselines, pool_start, warm_start
from evomerge.search.config import EvolveConfig
from evomerge.search.estimation import FitnessEstimator
from evomerge.search.evidence import record_run_evidence
from evomerge.search.external import ObjectiveFunction
from evomerge.search.genome import adopt_recorded_names
from evomerge.search.objectives import combine_scores, score_table
from evomerge.search.racing import entry_threshold, plan_race, race
from evomerge.search.samplers import make_sampler, population_size
from evomerge.search.session import CANDIDATE_FAILURES, Session, failure_reason, open_session
from evomerge.search.store import RunStore, TrialRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


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
    # Filled in by the run loop for the live display: trials counted against the budget so far, the
    # budget, and the best parent's search fitness (the reference the search must beat).
    finished: int = 0
    budget: int = 0
    best_parent: float | None = None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class SearchRun:
    """Drives one study: start-up (resume bookkeeping, evidence, baselines), the ask/tell loop, racing,
    de-duplication."""

    config: EvolveConfig
    root: Path
    run_dir: Path
    on_candidate: Callable[[CandidateResult], None] | None = None
    on_status: Callable[[str], None] | None = None
    objective_function: ObjectiveFunction | None = None
    session: Session = field(init=False)
    study: optuna.Study = field(init=False)
    store: RunStore = field(init=False)
    estimator: FitnessEstimator | None = field(init=False, default=None)
    best_parent: float | None = field(init=False, default=None)  # the best parent's search fitness, once scored

    def __post_init__(self) -> None:
        self.session = open_session(self.config, self.root, self.objective_function)
        self.genome = self.session.genome
        self.popsize = population_size(self.config, len(self.genome))
        racing = self.config.racing
        self.race = plan_race(self.session.sizes(), racing.first_fraction, self.config.seed, racing.growth)
        self.top_k = self.config.racing.top_k or self.popsize

    @property
    def distributions(self) -> dict[str, optuna.distributions.FloatDistribution]:
        """Every gene's range, what each trial is asked for."""
        return {gene.name: optuna.distributions.FloatDistribution(gene.low, gene.high) for gene in self.genome.genes}

    # --- study ----------------------------------------------------------------------------------
    def open_study(self, x0: Mapping[str, float] | None) -> optuna.Study:
        sampler = make_sampler(self.config, num_genes=len(self.genome), x0=x0)
        url = runs.storage_url(self.config, self.run_dir)
        try:
            self.study = optuna.create_study(
                study_name=self.config.name,
                storage=url,
                sampler=sampler,
                directions=self.session.objectives.study_directions,
                load_if_exists=True,
            )
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:  # unreachable server, missing driver
            reason = " ".join(str(error).split())[:200]
            raise ConfigError(f"cannot open the study database {url} ({type(error).__name__}: {reason})") from None
        return self.attach(self.study)

    def attach(self, study: optuna.Study) -> optuna.Study:
        """Use `study`: its run store, and the fitness estimator reading from it (workers attach theirs too)."""
        self.study = study
        self.store = RunStore(study)
        if self.config.fitness.estimator != "full":
            self.estimator = FitnessEstimator(
                self.config.fitness, self.session.objectives, self.session.sizes(), self.store, self.config.seed
            )
        return study

    def adopt_recorded_names(self) -> None:
        """Keep the gene names a resumed study recorded (`genome.adopt_recorded_names`: runs from before genes
        were named by parent use `m0`, `m1`), so its trials and re-queued genomes stay in the search space."""
        self.genome.genes = adopt_recorded_names(self.genome.genes, self.store.genes)

    def finished_trials(self) -> list[TrialRecord]:
        """Trials that count against the budget (interrupted ones were re-queued and do not)."""
        return self.store.counted_trials()

    def start(self) -> dict[str, float] | None:
        """Open the study, re-queue what a killed process left running, record the run's evidence and
        baselines, and store the search space; returns the CMA-ES mean the config's `start` asks for."""
        self.open_study(x0=None)
        self.adopt_recorded_names()
        self.store.set_metric_names(self.session.objectives.metric_names)
        self.store.requeue_interrupted()
        record_run_evidence(self.store, self.session.evidence(), device=str(self.session.device))
        baselines = evaluate_baselines(self.session, self.store, self._status)
        parents = [b["fitness"] for b in baselines.values() if b["kind"] == "parent" and b["fitness"] is not None]
        self.best_parent = max(parents, default=None)
        x0 = warm_start(self.session, baselines) if self.config.start == "best_baseline" else self.genome.initial()
        if self.config.parents_pool:  # a parameter-space genome: `parents_pool` refuses `dfs`
            x0 = {**x0, **pool_start(self.genome, baselines, self.session.objectives.signed_weights)}
        self.store.set_search_space([gene.__dict__ for gene in self.genome.genes], self.popsize)
        # Workers' samplers start from it, and the report shows where a pool's selection began.
        self.store.set_x0(x0 if self.config.resolved_optimizer == "cmaes" else None)
        return x0

    def run(self) -> optuna.Study:
        """Run (or resume) the search until the budget is spent."""
        x0 = self.start()
        if x0 is not None and self.config.resolved_optimizer == "cmaes":
            self.open_study(x0=x0)
        started = time.monotonic()
        budget = self.config.budget
        finished = len(self.finished_trials())
        while finished < budget.candidates:
            if budget.wall_seconds is not None and time.monotonic() - started > budget.wall_seconds:
                break
            result = self.step()
            finished = len(self.finished_trials())
            if self.on_candidate is not None:
                self.on_candidate(replace(result, finished=finished, budget=budget.candidates,
                                          best_parent=self.best_parent))
            if self.estimator is not None and self.estimator.audit_due(finished):
                self.audit()
        if self.estimator is not None:
            self.audit()  # the champion is chosen on full scores: the best estimates get them now
        return self.study

    def audit(self) -> list[int]:
        """Score the best estimated candidates on the whole search split (stored apart from their estimates)."""
        assert self.estimator is not None
        audited = []
        for record in self.estimator.to_audit():
            self._status(f"audit: candidate {record.number} on the whole search split")
            self.session.activate_candidate(self.session.candidate_of(record))
            started = time.perf_counter()
            scores = self.session.evaluate("search").scores
            self.store.set_audit(
                record.number, scores=score_table(scores, per_example=True),
                fitness=self.session.objectives.fitness({name: s.score for name, s in scores.items()}),
                examples=sum(s.n for s in scores.values()), seconds=time.perf_counter() - started,
            )
            audited.append(record.number)
        return audited

    # --- candidates -----------------------------------------------------------------------------
    def _status(self, message: str) -> None:
        if self.on_status is not None:
            self.on_status(message)

    def ask(self) -> optuna.Trial:
        """A new trial with every gene suggested (workers override this to start its heartbeat)."""
        return self.study.ask(self.distributions)

    def find_duplicate(self, trial: optuna.Trial, key: str) -> TrialRecord | None:
        """An earlier trial with the same genome, whose result this one copies instead of re-evaluating."""
        return next((r for r in self.store.fully_evaluated() if r.genome_key == key), None)

    def step(self) -> CandidateResult:
        """Ask for one candidate, evaluate it (with racing) and tell the study."""
        trial = self.ask()
        generation = self.store.generation_of(trial.number, self.popsize)
        genes = {name: trial.params[name] for name in self.genome.names}
        candidate = self.session.decode(genes)
        key, record = self.session.describe(genes, candidate)
        runs.write(trial, generation=generation, genome_key=key, **record)
        duplicate = self.find_duplicate(trial, key)
        if duplicate is not None:
            return self._tell_duplicate(trial, generation, duplicate)
        try:
            merge_seconds = self.session.activate_candidate(candidate)
            return self._evaluate_candidate(trial, generation, merge_seconds)
        except CANDIDATE_FAILURES as error:
            reason = failure_reason(error)
            runs.write(trial, status=runs.FAILED, failure=reason)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if self.session.device.type == "cuda":
                torch.cuda.empty_cache()
            return CandidateResult(trial.number, generation, "failed", None, (), {}, 0, 0, 0.0, 0.0, reason)

    def _tell_duplicate(self, trial: optuna.Trial, generation: int, original: TrialRecord) -> CandidateResult:
        runs.write(trial, scores=original.scores, fitness=original.fitness, examples=original.examples,
                   status=runs.DUPLICATE, duplicate_of=original.number)
        if original.state == optuna.trial.TrialState.FAIL:  # e.g. a NaN recipe another worker already tried
            runs.write(trial, failure=original.failure)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return CandidateResult(trial.number, generation, "duplicate", None, (), {}, 0, 0, 0.0, 0.0, original.failure)
        if original.state == optuna.trial.TrialState.PRUNED:  # a raced-out genome another worker scored
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return CandidateResult(
                trial.number, generation, "duplicate", original.fitness, (), original.scores or {}, 0, 0, 0.0, 0.0
            )
        self.study.tell(trial, original.values)
        return CandidateResult(
            trial.number, generation, "duplicate", original.fitness, tuple(original.values or ()),
            original.scores or {}, 0, 0, 0.0, 0.0,
        )

    def _evaluate_candidate(self, trial: optuna.Trial, generation: int, merge_seconds: float) -> CandidateResult:
        objectives = self.session.objectives
        racing = self.config.racing.enabled and not objectives.pareto and self.estimator is None
        started = time.perf_counter()
        total_examples = sum(self.session.sizes().values())
        estimate = None
        if self.estimator is not None:
            full = self.estimator.wants_full()
            anchors = self.estimator.anchors
            # A fully scored candidate gets the estimate from its anchor answers too (free, or one forward
            # pass over the anchors): the report's estimate error. Its own values join the fit once stored.
            if self.estimator.graded:
                anchor_scores = self.session.answer_probabilities(
                    "search", anchors, against_rival=self.estimator.against_rival,
                    zero_if_lost=self.estimator.zero_if_lost
                ).scores
                scores = dict(self.session.evaluate("search").scores) if full else dict(anchor_scores)
            else:
                scores = dict(self.session.evaluate("search", None if full else anchors).scores)
                anchor_scores = scores
            estimate = self.estimator.estimate(anchor_scores)
            status = runs.COMPLETE if full else runs.ESTIMATED
        elif racing:
            scores: dict[str, TaskScore] = {}

            def score_round(indices: dict[str, list[int]]) -> dict[str, list[float]]:
                for name, score in self.session.evaluate("search", indices).scores.items():
                    scores[name] = combine_scores(scores[name], score) if name in scores else score
                # Optuna sees each round's partial fitness as an intermediate value, step = examples so far.
                partial = objectives.fitness({name: s.score for name, s in scores.items()})
                if math.isfinite(partial):
                    trial.report(partial, step=sum(s.n for s in scores.values()))
                return {name: score.values for name, score in scores.items()}

            fitnesses = [r.fitness for r in self.store.fully_evaluated()]
            threshold = entry_threshold(fitnesses, self.top_k)
            raced_out = race(self.race, score_round, dict(objectives.signed_weights), threshold,
                             self.config.racing.confidence)
            status = runs.RACED_OUT if raced_out else runs.COMPLETE
        else:
            scores = dict(self.session.evaluate("search").scores)
            status = runs.COMPLETE
        eval_seconds = time.perf_counter() - started
        plain = {name: s.score for name, s in scores.items()}
        fitness = objectives.fitness(plain) if status != runs.ESTIMATED else estimate.fitness
        if not math.isfinite(fitness):  # e.g. weights that overflow in the forward pass: a failed candidate
            raise ValueError(f"the candidate's fitness is {fitness} (non-finite scores: {plain})")
        examples = sum(s.n for s in scores.values())
        graded = self.estimator is not None and self.estimator.graded
        if graded and status == runs.COMPLETE:
            examples += self.estimator.examples  # the anchors' forward pass beside the full scores
        # Full scores keep per-example values when an estimator learns from them.
        table = score_table(scores, per_example=self.estimator is not None and status == runs.COMPLETE)
        if estimate is not None:
            runs.write(trial, estimate=estimate.to_dict())
        runs.write(
            trial, status=status, scores=table, fitness=fitness, split="search", examples=examples,
            examples_saved=total_examples - examples, merge_seconds=merge_seconds, eval_seconds=eval_seconds,
            tokens=sum(s.tokens for s in scores.values()), peak_memory_bytes=peak_memory_bytes(self.session.device),
            device=str(self.session.device),
        )
        # Graded estimates are biased low, so then every candidate, a fully scored one too, is told its
        # estimate: the optimizer compares like with like. The champion is still chosen on `fitness`.
        if status == runs.ESTIMATED or graded:
            values: tuple[float, ...] = (estimate.fitness if graded else fitness,)
        else:
            values = objectives.values(plain)
        if status == runs.RACED_OUT:
            # Pruned, not complete: a partial score is no full one (CMA-ES ignores pruned trials; the
            # dashboard and importance plots then never mix partial with full scores).
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, list(values))
        return CandidateResult(
            trial.number, generation, status, fitness, values, table, examples, total_examples - examples,
            merge_seconds, eval_seconds,
        )
