"""Coordination of many workers on one study: heartbeats, genome claims and budget slots; and the lock that
keeps a run directory to one coordinating process.

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

Only Optuna's public storage API is used (study and trial ids come from the storage's own look-ups).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials

from evomerge.errors import ConfigError

HEARTBEAT_SECONDS = 5
# Generous: on a loaded machine a live worker's beat can be late, and failing a live trial wastes its work.
GRACE_SECONDS = 60
LOCK_FILE = ".evomerge.lock"
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


@contextmanager
def exclusive_run(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for one coordinating process (workers attach through the study instead).

    An advisory `flock` dies with its process, so a killed coordinator never leaves a stale lock behind.
    """
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"run directory {run_dir} is in use by evomerge process {holder}; wait for it to finish or stop "
                "it (to add workers to a running search, use `evomerge worker`)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
