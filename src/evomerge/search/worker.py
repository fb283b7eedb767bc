"""Many workers on one search: each process holds its parents resident and pulls candidates from a shared study.

How the workers stay out of each other's way (heartbeats, genome claims, budget slots) is
`search.coordination`; this module is the worker loop, the coordinator and process start-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search import store as runs
from evomerge.search.config import EvolveConfig
from evomerge.search.coordination import (
    GRACE_SECONDS,
    HEARTBEAT_SECONDS,
    BudgetSlots,
    GenomeClaims,
    Heartbeat,
    fail_dead_trials,
    open_storage,
)
from evomerge.search.run import CandidateResult, SearchRun
from evomerge.search.samplers import make_sampler
from evomerge.search.store import TrialRecord

POLL_SECONDS = 0.25


@dataclass(frozen=True)
class WorkerTarget:
    """What a worker needs to join a search: the config, where relative paths start, the database."""

    config: EvolveConfig
    root: Path
    run_dir: Path
    storage_url: str


def resolve_target(target: str, study_name: str | None) -> WorkerTarget:
    """A run directory (its frozen config) or a database URL (the config the coordinator stored)."""
    path = Path(target)
    if path.is_dir():
        config = runs.frozen_config(path)
        url = runs.storage_url(config, path)
        _, root = runs.open_store(url, study_name or config.name).published
        return WorkerTarget(config, Path(root or path), path, url)
    if "://" not in target:
        raise ConfigError(f"worker target {target} is neither a run directory nor a database URL")
    if study_name is None:
        raise ConfigError("a worker given a database URL needs --study NAME")
    stored, root = runs.open_store(target, study_name).published
    if stored is None:
        raise ConfigError(f"study '{study_name}' at {target} has no config yet; start the coordinator first")
    config = EvolveConfig.model_validate(stored)
    return WorkerTarget(config, Path(root), Path(root), target)


class WorkerRun(SearchRun):
    """A `SearchRun` that shares its study with other processes: heartbeats, claims, a shared budget."""

    def __init__(self, target: WorkerTarget, *, worker_index: int = 0, device: str | None = None,
                 heartbeat_seconds: int = HEARTBEAT_SECONDS, grace_seconds: int = GRACE_SECONDS,
                 on_candidate: Callable[[CandidateResult], None] | None = None):
        config = target.config if device is None else target.config.model_copy(update={"device": device})
        super().__init__(config, target.root, target.run_dir, on_candidate=on_candidate)
        self.worker_index = worker_index
        self.storage = open_storage(target.storage_url, heartbeat_seconds=heartbeat_seconds, grace_seconds=grace_seconds)
        self.heartbeat = Heartbeat(self.storage, self.storage.heartbeat_interval)
        self.claims: GenomeClaims | None = None
        self.slots: BudgetSlots | None = None
        self._slot: int | None = None  # reserved by `work` for the next `ask`

    def open_study(self, x0=None) -> optuna.Study:
        # Each worker's sampler gets its own seed: identically seeded samplers would all propose the
        # same genomes. The recipe seed (DARE masks) stays the config's, so results do not depend on
        # which worker evaluated a candidate.
        sampler_config = self.config.model_copy(update={"seed": self.config.seed + 7919 * (self.worker_index + 1)})
        self.attach(optuna.load_study(
            study_name=self.config.name, storage=self.storage,
            sampler=make_sampler(sampler_config, num_genes=len(self.genome), x0=x0),
        ))
        self.study_id = self.storage.get_study_id_from_name(self.config.name)
        self.claims = GenomeClaims(self.storage, self.study_id)
        self.slots = BudgetSlots(self.storage, self.study_id, self.config.budget.candidates, self.storage.grace_period)
        return self.study

    def trial_id_of(self, number: int) -> int:
        """The storage's id of trial `number` (Optuna's public look-up)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def ask(self) -> optuna.Trial:
        fail_dead_trials(self.study)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat ourselves, below
            trial = self.study.ask(self.distributions)
        self.heartbeat.track(self.trial_id_of(trial.number))
        if self._slot is not None:
            assert self.slots is not None
            self.slots.bind(self._slot, trial.number)
            self._slot = None
        return trial

    def find_duplicate(self, trial: optuna.Trial, key: str) -> TrialRecord | None:
        """None when this trial owns the genome; else the owner's finished trial (waiting for it if needed)."""
        assert self.claims is not None
        owner = self.claims.claim(key, trial.number)
        while owner != trial.number:
            frozen = TrialRecord.of(self.storage.get_trial(self.trial_id_of(owner)))
            if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                frozen.state == TrialState.FAIL and frozen.status in (runs.FAILED, runs.DUPLICATE)
            ):
                return frozen
            if frozen.state == TrialState.FAIL:  # its worker died mid-candidate: evaluate it here instead
                if self.claims.take_over(key, owner, trial.number):
                    return None
                owner = self.claims.owner(key)
                continue
            time.sleep(POLL_SECONDS)
            fail_dead_trials(self.study)
        return None

    def step(self) -> CandidateResult:
        try:
            return super().step()
        finally:
            self.heartbeat.clear()

    def work(self, max_candidates: int | None = None) -> int:
        """Pull candidates until the shared budget (or this worker's `max_candidates`) is spent."""
        self.open_study(x0=None)
        self.adopt_recorded_names()
        x0 = self.store.x0  # the coordinator's warm start
        if x0 is not None:
            self.open_study(x0=x0)
        budget = self.config.budget
        assert self.slots is not None
        self.slots.adopt([r.number for r in self.store.counted_trials()])
        started = time.monotonic()
        done = 0
        try:
            while max_candidates is None or done < max_candidates:
                if budget.wall_seconds is not None and time.monotonic() - started > budget.wall_seconds:
                    break
                fail_dead_trials(self.study)
                self._slot = self.slots.reserve(runs.retried(self.store.trials()))
                if self._slot is None:
                    if len(self.finished_trials()) >= budget.candidates:
                        break
                    # The rest is in flight elsewhere; stay until it finishes, since a worker may still die.
                    time.sleep(POLL_SECONDS)
                    continue
                result = self.step()
                done += 1
                if self.on_candidate is not None:
                    self.on_candidate(result)
        finally:
            self.heartbeat.close()
        return done


def worker_devices(device: str, workers: int) -> list[str]:
    """One device per worker: round-robin over the visible GPUs when the config asks for CUDA."""
    if device.startswith("cuda") and device in ("cuda", "cuda:0"):
        import torch

        count = torch.cuda.device_count()
        if count > 1:
            return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def run_with_workers(run: SearchRun, workers: int, *, on_status: Callable[[str], None] | None = None) -> optuna.Study:
    """The coordinator: baselines and the published config here, candidates in `workers` processes."""
    run.start()  # no worker runs yet, so anything RUNNING was left by a dead process
    run.store.publish_config(run.config, run.root)
    if on_status is not None:
        on_status(f"{workers} workers searching")
    processes = spawn_workers(run.run_dir, run.config.name, worker_devices(run.config.device, workers))
    failed = [p.args for p in processes if p.wait() != 0]
    run.open_study(x0=None)
    if failed and len(run.finished_trials()) < run.config.budget.candidates:
        raise ConfigError(f"{len(failed)} of {workers} workers failed before the budget was spent; resume with the same --run")
    if run.estimator is not None:  # workers only estimate: the final audit of the best estimates is done here
        run.audit()
    return run.study


def spawn_workers(run_dir: Path, study_name: str, devices: Sequence[str]) -> list[subprocess.Popen]:
    """Start one `evomerge worker` process per device entry."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "evomerge.cli", "worker", str(run_dir), "--study", study_name,
             "--device", device, "--index", str(index)],
            env=env,
        )
        for index, device in enumerate(devices)
    ]


def run_worker(target: str, *, study: str | None = None, device: str | None = None, index: int = 0,
               max_candidates: int | None = None, heartbeat_seconds: int = HEARTBEAT_SECONDS,
               grace_seconds: int = GRACE_SECONDS,
               on_candidate: Callable[[CandidateResult], None] | None = None) -> int:
    """Join the search at `target` (run directory or database URL); returns candidates evaluated here."""
    resolved = resolve_target(target, study)
    worker = WorkerRun(resolved, worker_index=index, device=device, heartbeat_seconds=heartbeat_seconds,
                       grace_seconds=grace_seconds, on_candidate=on_candidate)
    return worker.work(max_candidates)
