"""Many workers on one search: each process holds its parents resident and pulls candidates from a shared study.

A worker opens the study through Optuna's `RDBStorage` with heartbeats. Optuna only records heartbeats
inside `Study.optimize`; with ask/tell the worker records them itself, from a background thread, for the
trial in flight. Before every ask (and while waiting), `optuna.storages.fail_stale_trials` fails trials whose
heartbeat stopped — a worker that was killed — and `RetryHeartbeatStaleTrialCallback` re-queues their genome,
so the next worker that looks evaluates it. Nothing else is lost: every finished candidate is on its trial.

De-duplication across workers is a claim: the first trial to insert a genome's key into a small table
beside Optuna's (a primary key, so exactly one insert wins, on SQLite and PostgreSQL alike) evaluates it;
any other trial with that genome waits for the owner and copies its result. A claim whose owner died is
taken over with a compare-and-swap update, so a dead worker's genome is still evaluated exactly once.

The candidate budget is exact: before every ask a worker reserves one of `budget` numbered slots in a
second small table (`BudgetSlots`). Slots are taken by a primary-key insert or a compare-and-swap update,
so no two workers hold the same slot; a slot whose trial died (failed and re-queued) or whose reservation
was never bound to a trial within the grace period is reclaimed, so a re-queued candidate is counted once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import sqlalchemy
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.search.config import EvolveConfig
from evomerge.search.run import CONFIG_FILE, CandidateResult, SearchRun, storage_url
from evomerge.search.samplers import make_sampler

HEARTBEAT_SECONDS = 5
# Generous: on a loaded machine a live worker's beat can be late, and failing a live trial wastes its work.
GRACE_SECONDS = 60
POLL_SECONDS = 0.25
MAX_RETRIES = 3  # a genome that kills its worker three times is left failed rather than retried forever


def open_storage(url: str, *, heartbeat_seconds: int = HEARTBEAT_SECONDS, grace_seconds: int = GRACE_SECONDS) -> RDBStorage:
    """The study database with heartbeats on and dead workers' trials re-queued (up to `MAX_RETRIES`)."""
    # SQLite serialises writers; several processes need a generous lock timeout instead of "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_seconds,
            grace_period=grace_seconds,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and, through the storage's callback, re-queue) trials whose worker stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


class Heartbeat:
    """A daemon thread recording the heartbeat of whichever trial this worker has in flight."""

    def __init__(self, storage: RDBStorage, interval: float):
        self.storage = storage
        self.interval = interval
        self._trial_id: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def track(self, trial_id: int) -> None:
        """Beat for `trial_id` from now on; the first beat is recorded before returning."""
        with self._lock:
            self._trial_id = trial_id
            self.storage.record_heartbeat(trial_id)

    def clear(self) -> None:
        with self._lock:
            self._trial_id = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._trial_id is not None:
                    self.storage.record_heartbeat(self._trial_id)


class GenomeClaims:
    """Which trial owns the evaluation of each genome of a study (one row per genome key)."""

    def __init__(self, storage: RDBStorage, study_id: int):
        self.engine = storage.engine
        self.study_id = study_id
        metadata = sqlalchemy.MetaData()
        self.table = sqlalchemy.Table(
            "evomerge_genome_claims",
            metadata,
            sqlalchemy.Column("study_id", sqlalchemy.Integer, primary_key=True),
            sqlalchemy.Column("genome_key", sqlalchemy.String(64), primary_key=True),
            sqlalchemy.Column("trial_number", sqlalchemy.Integer, nullable=False),
        )
        metadata.create_all(self.engine, checkfirst=True)

    def claim(self, key: str, number: int) -> int:
        """Claim `key` for trial `number`; returns the owner (`number` itself when this claim won)."""
        row = {"study_id": self.study_id, "genome_key": key, "trial_number": number}
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(**row))
            return number
        except sqlalchemy.exc.IntegrityError:
            return self.owner(key)

    def owner(self, key: str) -> int:
        query = sqlalchemy.select(self.table.c.trial_number).where(
            self.table.c.study_id == self.study_id, self.table.c.genome_key == key
        )
        with self.engine.connect() as connection:
            return int(connection.execute(query).scalar_one())

    def take_over(self, key: str, dead_owner: int, number: int) -> bool:
        """Move the claim from a dead owner to `number`; only one of several racing takers succeeds."""
        update = (
            self.table.update()
            .where(
                self.table.c.study_id == self.study_id,
                self.table.c.genome_key == key,
                self.table.c.trial_number == dead_owner,
            )
            .values(trial_number=number)
        )
        with self.engine.begin() as connection:
            return connection.execute(update).rowcount == 1


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """Trials whose candidate was re-queued (by the coordinator or a heartbeat retry): they do not count."""
    retried = {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
    retried.update(n for t in trials for n in t.system_attrs.get("retry_history", ()))
    return retried


class BudgetSlots:
    """`budget` numbered slots per study; a trial may only be asked for by a worker holding a free slot.

    Rows are inserted densely (slot k only after 0..k-1 exist) and never deleted: a row is rebound when
    its trial died, so the number of counted trials can never exceed the budget, whatever the timing.
    """

    def __init__(self, storage: RDBStorage, study_id: int, budget: int, grace_seconds: float):
        self.engine = storage.engine
        self.study_id = study_id
        self.budget = budget
        self.grace_seconds = grace_seconds
        metadata = sqlalchemy.MetaData()
        self.table = sqlalchemy.Table(
            "evomerge_budget_slots",
            metadata,
            sqlalchemy.Column("study_id", sqlalchemy.Integer, primary_key=True),
            sqlalchemy.Column("slot", sqlalchemy.BigInteger, primary_key=True, autoincrement=False),
            # NULL between the reservation and the ask that binds it (a worker dying there is reclaimed).
            sqlalchemy.Column("trial_number", sqlalchemy.Integer, nullable=True),
            sqlalchemy.Column("reserved_at", sqlalchemy.Float, nullable=False),
        )
        metadata.create_all(self.engine, checkfirst=True)

    def rows(self) -> list[tuple[int, int | None, float]]:
        """(slot, trial number or None, reservation time) for every slot of this study."""
        query = sqlalchemy.select(self.table.c.slot, self.table.c.trial_number, self.table.c.reserved_at).where(
            self.table.c.study_id == self.study_id)
        with self.engine.connect() as connection:
            return [(int(s), t, float(r)) for s, t, r in connection.execute(query)]

    def _insert(self, slot: int, trial_number: int | None) -> bool:
        row = {"study_id": self.study_id, "slot": slot, "trial_number": trial_number, "reserved_at": time.time()}
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(**row))
            return True
        except sqlalchemy.exc.IntegrityError:
            return False

    def _swap(self, slot: int, trial_number: int | None, reserved_at: float, new_trial: int | None) -> bool:
        """Compare-and-swap: rebind `slot` only if nobody changed it since it was read."""
        holder = (self.table.c.trial_number.is_(None) if trial_number is None
                  else self.table.c.trial_number == trial_number)
        update = (
            self.table.update()
            .where(self.table.c.study_id == self.study_id, self.table.c.slot == slot, holder,
                   self.table.c.reserved_at == reserved_at)
            .values(trial_number=new_trial, reserved_at=time.time())
        )
        with self.engine.begin() as connection:
            return connection.execute(update).rowcount == 1

    def adopt(self, counted: Sequence[int]) -> None:
        """Give slots to counted trials that predate the slots (a run resumed with workers)."""
        bound = {t for _, t, _ in self.rows() if t is not None}
        for number in counted:
            if number not in bound:
                self._reserve_fresh(number)

    def _reserve_fresh(self, trial_number: int | None) -> int | None:
        slot = len(self.rows())
        while slot < self.budget:
            if self._insert(slot, trial_number):
                return slot
            slot += 1  # another worker inserted this one first; rows stay dense, so try the next
        return None

    def reserve(self, dead: set[int]) -> int | None:
        """A slot for the next ask, or None while every slot is held by a live or finished trial."""
        slot = self._reserve_fresh(None)
        if slot is not None:
            return slot
        now = time.time()
        for slot, trial, reserved_at in self.rows():
            abandoned = trial is None and now - reserved_at > self.grace_seconds
            if (trial in dead or abandoned) and self._swap(slot, trial, reserved_at, None):
                return slot
        return None

    def bind(self, slot: int, trial_number: int) -> None:
        """Record which trial the reservation was spent on."""
        update = self.table.update().where(self.table.c.study_id == self.study_id, self.table.c.slot == slot).values(
            trial_number=trial_number)
        with self.engine.begin() as connection:
            connection.execute(update)


def publish_config(study: optuna.Study, config: EvolveConfig, root: Path) -> None:
    """Store the frozen config in the study so a worker given only the database URL can start."""
    study.set_user_attr("config", config.model_dump(mode="json"))
    study.set_user_attr("root", str(root))


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
        frozen = path / CONFIG_FILE
        if not frozen.is_file():
            raise ConfigError(f"{path} is not an evomerge run directory (no {CONFIG_FILE})")
        config = EvolveConfig.model_validate(yaml.safe_load(frozen.read_text()))
        url = storage_url(config, path)
        stored = _stored_attrs(url, study_name or config.name)
        return WorkerTarget(config, Path(stored.get("root", path)), path, url)
    if "://" not in target:
        raise ConfigError(f"worker target {target} is neither a run directory nor a database URL")
    if study_name is None:
        raise ConfigError("a worker given a database URL needs --study NAME")
    stored = _stored_attrs(target, study_name)
    if "config" not in stored:
        raise ConfigError(f"study '{study_name}' at {target} has no config yet; start the coordinator first")
    config = EvolveConfig.model_validate(stored["config"])
    return WorkerTarget(config, Path(stored["root"]), Path(stored["root"]), target)


def _stored_attrs(url: str, study_name: str) -> dict:
    try:
        return dict(optuna.load_study(study_name=study_name, storage=url).user_attrs)
    except KeyError:
        raise ConfigError(f"no study named '{study_name}' at {url}") from None
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise ConfigError(f"cannot open the study database {url}: {type(error).__name__}") from None


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
        self.study = optuna.load_study(
            study_name=self.config.name, storage=self.storage,
            sampler=make_sampler(sampler_config, num_genes=len(self.genome), x0=x0),
        )
        self.claims = GenomeClaims(self.storage, self.study._study_id)
        self.slots = BudgetSlots(self.storage, self.study._study_id, self.config.budget.candidates,
                                 self.storage.grace_period)
        return self.study

    def ask(self) -> optuna.Trial:
        fail_dead_trials(self.study)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat ourselves, below
            trial = self.study.ask(self.distributions)
        self.heartbeat.track(trial._trial_id)
        if self._slot is not None:
            assert self.slots is not None
            self.slots.bind(self._slot, trial.number)
            self._slot = None
        return trial

    def find_duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        """None when this trial owns the genome; else the owner's finished trial (waiting for it if needed)."""
        assert self.claims is not None
        owner = self.claims.claim(key, trial.number)
        while owner != trial.number:
            frozen = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, owner))
            if frozen.state == TrialState.COMPLETE or (
                frozen.state == TrialState.FAIL and frozen.user_attrs.get("status") in ("failed", "duplicate")
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
        x0 = self.open_study(x0=None).user_attrs.get("x0")  # the coordinator's warm start
        if x0 is not None:
            self.open_study(x0=x0)
        budget = self.config.budget
        assert self.slots is not None
        trials = self.study.get_trials(deepcopy=False)
        dead = retried_numbers(trials)
        self.slots.adopt([t.number for t in trials if t.state.is_finished() and t.number not in dead])
        started = time.monotonic()
        done = 0
        try:
            while max_candidates is None or done < max_candidates:
                if budget.wall_seconds is not None and time.monotonic() - started > budget.wall_seconds:
                    break
                fail_dead_trials(self.study)
                trials = self.study.get_trials(deepcopy=False)
                self._slot = self.slots.reserve(retried_numbers(trials))
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
    run.open_study(x0=None)
    run.requeue_interrupted()  # no worker runs yet, so anything RUNNING was left by a dead process
    run.record_evidence()
    baselines = run.evaluate_baselines()
    x0 = run.warm_start(baselines)
    run.study.set_user_attr("x0", x0 if run.config.resolved_optimizer == "cmaes" else None)
    run.study.set_user_attr("genes", [gene.__dict__ for gene in run.genome.genes])
    run.study.set_user_attr("population", run.popsize)
    publish_config(run.study, run.config, run.root)
    if on_status is not None:
        on_status(f"{workers} workers searching")
    processes = spawn_workers(run.run_dir, run.config.name, worker_devices(run.config.device, workers))
    failed = [p.args for p in processes if p.wait() != 0]
    run.open_study(x0=None)
    if failed and len(run.finished_trials()) < run.config.budget.candidates:
        raise ConfigError(f"{len(failed)} of {workers} workers failed before the budget was spent; resume with the same --run")
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
