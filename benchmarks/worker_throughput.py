"""Candidates per minute with 1, 2 and 4 CPU workers on PostgreSQL vs. the single-process SQLite run.

The problem is the demo's: the default tiny zoo (cached in ~/.cache/evomerge), DARE-TIES over its three
specialists with the demo genome (a weight per layer and parent, one density per parent). A demo candidate
on the target task alone costs ~0.3 s of compute, too little to see scaling past storage and process
start-up, so fitness here is the mean over all five zoo tasks' search splits (1,100 examples) at an
evaluation batch of 32: ~1 s of single-threaded compute per candidate. Racing is off (every candidate costs
the same work) and the sampler is random (every configuration draws from the same distribution).

Every configuration runs in fresh, single-threaded processes (`cpu_threads: 1`, `OMP_NUM_THREADS=1`):
the SQLite baseline is `SearchRun.step` in a loop in one process; the worker rows are
`search.worker.run_worker` processes sharing a PostgreSQL study (`tests/postgres.py`).

Throughput is the steady state, read from the study: the trials' completion times (Optuna's
`datetime_complete`) in the window where every process is evaluating (from the last process's first
trial start to the first process's last completion), rate = (completions - 1) / (last - first).
Start-up (spawn to the process's first trial) is reported apart. Storage seconds per candidate: every
ask/tell/set_user_attr/get_trials and the worker's claim, budget-slot and stale-trial calls, timed in each
process between its first and last candidate. Cores obtained: each process's CPU seconds over its wall
span from first to last candidate, summed over processes (the machine is shared, so this is what the
benchmark actually got; the PostgreSQL server's own CPU is not in it). After every run the study is checked: candidates completed
(= the budget), lost (counted trials missing or still in flight) and duplicates evaluated (a genome
evaluated twice).

    flock /tmp/bench.lock python benchmarks/worker_throughput.py [--candidates 40] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres import postgres_server

EVALUATED = ("complete", "raced_out", "failed")


def write_config(root: Path, zoo_dir: Path, tasks: Sequence[str], candidates: int, batch_size: int,
                 storage: str | None, name: str) -> Path:
    """The demo's evolve config with the benchmark's fitness, budget and sampler."""
    from evomerge.pipelines.demo import demo_config
    from evomerge.zoo import Zoo

    zoo = Zoo.load(zoo_dir)
    config = demo_config(zoo, candidates=candidates)
    config.update({
        "name": name, "objectives": [{"task": str(zoo.tasks[task])} for task in tasks],
        "racing": {"enabled": False}, "optimizer": "random", "batch_size": batch_size,
    })
    if storage is not None:
        config["storage"] = storage
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def instrument() -> dict[str, float]:
    """Time every storage call of this process (outermost call only); returns the live total."""
    from evomerge.search import coordination, worker

    totals = {"seconds": 0.0}
    depth = [0]  # Study.ask calls get_trials itself: count the outer call once

    def timed(function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    totals["seconds"] += time.perf_counter() - started
        return wrapper

    for owner, name in ((optuna.Study, "ask"), (optuna.Study, "tell"), (optuna.Study, "get_trials"),
                        (optuna.Trial, "set_user_attr"), (worker, "fail_dead_trials"),
                        (coordination.BudgetSlots, "reserve"), (coordination.BudgetSlots, "bind"),
                        (coordination.GenomeClaims, "claim")):
        setattr(owner, name, timed(getattr(owner, name)))
    return totals


def mark(number: int, totals: dict[str, float]) -> tuple[int, float, float, float]:
    """(trial number, storage seconds so far, this process's CPU seconds so far, wall clock) after a candidate."""
    return number, totals["seconds"], time.process_time(), time.time()


def sqlite_process(config_path: str, run_dir: str, results) -> None:
    """The single-process baseline: `SearchRun.step` in a loop on the run directory's SQLite study."""
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun

    totals = instrument()
    config, root = load_evolve_config(Path(config_path))
    run = SearchRun(config, root, Path(run_dir))
    run.open_study(x0=None)
    marks = []
    while len(run.finished_trials()) < config.budget.candidates:
        marks.append(mark(run.step().number, totals))
    results.put((0, marks))


def worker_process(url: str, study: str, index: int, results) -> None:
    from evomerge.search.worker import run_worker

    totals = instrument()
    marks = []
    run_worker(url, study=study, index=index, device="cpu",
               on_candidate=lambda result: marks.append(mark(result.number, totals)))
    results.put((index, marks))


Marks = list[tuple[int, float, float, float]]


def run_processes(target: Callable, args: Sequence[tuple]) -> tuple[list[datetime], list[Marks]]:
    """Spawn one fresh process per argument tuple; their spawn times and per-candidate `mark`s."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*a, results)) for a in args]
    spawned = []
    for process in processes:
        spawned.append(datetime.now())  # Optuna stamps trials with naive local datetime.now() too
        process.start()
    reports = dict(results.get(timeout=3600) for _ in processes)
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a benchmark process exited with {process.exitcode}")
    return spawned, [reports[i] for i in range(len(processes))]


def check(study: optuna.Study, budget: int) -> tuple[int, int, int]:
    """(completed, lost, duplicates evaluated) of a finished study."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    counted = [t for t in trials if t.number not in retried and t.state.is_finished()]
    in_flight = sum(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) for t in trials)
    keys = Counter(t.user_attrs["genome_key"] for t in trials if t.user_attrs.get("status") in EVALUATED)
    duplicates = sum(count - 1 for count in keys.values())
    return len(counted), max(budget - len(counted), 0) + in_flight, duplicates


def steady_rate(completions: Sequence[datetime]) -> float:
    """Candidates per minute from completion times: (n - 1) completions over the span first -> last."""
    ordered = sorted(completions)
    if len(ordered) < 3:
        raise ValueError("fewer than 3 completions in the steady window; raise --candidates")
    return 60 * (len(ordered) - 1) / (ordered[-1] - ordered[0]).total_seconds()


@dataclass(frozen=True)
class Row:
    setup: str
    processes: int
    completed: int
    lost: int
    duplicates: int
    steady_per_min: float
    end_to_end_per_min: float
    window_completions: int
    startup_s: list[float]
    compute_s: float  # mean merge + evaluation seconds of one candidate
    storage_s: float  # mean storage seconds of one candidate
    cores: float  # CPU cores the benchmark's processes obtained in steady state (others share the machine)
    per_process: list[int]
    load: float


def summarise(setup: str, study: optuna.Study, budget: int, spawned: list[datetime],
              marks: list[Marks]) -> Row:
    """The figures of one finished configuration, from its study and its processes' marks."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    owned = [[trials[m[0]] for m in process_marks] for process_marks in marks]
    window_start = max(min(t.datetime_start for t in own) for own in owned)
    window_end = min(max(t.datetime_complete for t in own) for own in owned)
    in_window = [t.datetime_complete for own in owned for t in own if window_start <= t.datetime_complete <= window_end]
    first_start = [min(t.datetime_start for t in own) for own in owned]
    last = max(t.datetime_complete for own in owned for t in own)
    # Storage between each process's first and last candidate: (n - 1) candidates' worth of calls,
    # leaving out start-up (study opened, slots adopted) and the final wait for others' in-flight trials.
    storage = [(m[-1][1] - m[0][1], len(m) - 1) for m in marks if len(m) > 1]
    evaluated = [t for own in owned for t in own if t.user_attrs.get("status") == "complete"]
    completed, lost, duplicates = check(study, budget)
    return Row(
        setup=setup, processes=len(marks), completed=completed, lost=lost, duplicates=duplicates,
        steady_per_min=steady_rate(in_window), window_completions=len(in_window),
        end_to_end_per_min=60 * completed / (last - spawned[0]).total_seconds(),
        startup_s=[(first - spawn).total_seconds() for first, spawn in zip(first_start, spawned, strict=True)],
        compute_s=statistics.mean(t.user_attrs["merge_seconds"] + t.user_attrs["eval_seconds"] for t in evaluated),
        storage_s=sum(s for s, _ in storage) / max(sum(n for _, n in storage), 1),
        cores=sum((m[-1][2] - m[0][2]) / (m[-1][3] - m[0][3]) for m in marks if len(m) > 1),
        per_process=[len(m) for m in marks], load=os.getloadavg()[0],
    )


def run_sqlite(root: Path, zoo_dir: Path, tasks: Sequence[str], candidates: int, batch_size: int) -> Row:
    from evomerge.search.config import load_evolve_config
    from evomerge.search.store import prepare_run_dir, storage_url

    config_path = write_config(root, zoo_dir, tasks, candidates, batch_size, None, "sqlite")
    config, _ = load_evolve_config(config_path)
    run_dir = root / "run_sqlite"
    prepare_run_dir(config, run_dir)
    spawned, marks = run_processes(sqlite_process, [(str(config_path), str(run_dir))])
    study = optuna.load_study(study_name=config.name, storage=storage_url(config, run_dir))
    return summarise("SQLite, 1 process (in-process loop)", study, candidates, spawned, marks)


def run_postgres(root: Path, zoo_dir: Path, tasks: Sequence[str], candidates: int, batch_size: int,
                 workers: int, url: str) -> Row:
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun
    from evomerge.search.store import RunStore, prepare_run_dir

    name = f"pg{workers}"
    config, base = load_evolve_config(write_config(root, zoo_dir, tasks, candidates, batch_size, url, name))
    prepare_run_dir(config, root / f"run_{name}")
    study = SearchRun(config, base, root / f"run_{name}").open_study(x0=None)
    RunStore(study).publish_config(config, base)
    spawned, marks = run_processes(worker_process, [(url, name, i) for i in range(workers)])
    return summarise(f"PostgreSQL, {workers} worker{'s' if workers > 1 else ''}", study, candidates, spawned, marks)


def print_table(rows: Sequence[Row]) -> None:
    """Markdown table: steady throughput and its ratio to 1 worker and to the single process."""
    single = rows[0].steady_per_min
    one_worker = next((r.steady_per_min for r in rows if r.setup.startswith("PostgreSQL, 1 ")), None)
    print("| setup | steady cand/min | vs 1 worker | vs single process | end-to-end cand/min | start-up s "
          "| compute s/cand | storage s/cand | cores obtained | cand/min per core | completed | lost | dup. evaluated | per process | load |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        vs_one = f"{r.steady_per_min / one_worker:.2f}x" if one_worker and r.setup.startswith("PostgreSQL") else "—"
        print(f"| {r.setup} | {r.steady_per_min:.1f} | {vs_one} | {r.steady_per_min / single:.2f}x "
              f"| {r.end_to_end_per_min:.1f} | {', '.join(f'{s:.1f}' for s in r.startup_s)} | {r.compute_s:.2f} "
              f"| {r.storage_s:.3f} | {r.cores:.2f} | {r.steady_per_min / r.cores:.1f} | {r.completed} | {r.lost} | {r.duplicates} "
              f"| {', '.join(map(str, r.per_process))} | {r.load:.2f} |")
    print(f"(steady window completions: {', '.join(str(r.window_completions) for r in rows)})")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tasks", nargs="+", default=["target", "add", "l2_add", "reverse", "translate"],
                        help="zoo tasks averaged into the fitness (the demo uses only 'target')")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--zoo", type=Path, default=None, help="default: the cached default tiny zoo")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by every spawned process: one thread each

    from evomerge.zoo import build_zoo, default_zoo_dir

    zoo_dir = args.zoo or default_zoo_dir("tiny", 0)
    build_zoo(zoo_dir)  # reuses the cache when its build matches; builds it (minutes) otherwise
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()}, python {platform.python_version()}")
    print(f"# zoo {zoo_dir}, tasks {args.tasks}, batch {args.batch_size}, {args.candidates} candidates")
    root = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    rows = [run_sqlite(root, zoo_dir, args.tasks, args.candidates, args.batch_size)]
    with postgres_server() as url:
        rows += [run_postgres(root, zoo_dir, args.tasks, args.candidates, args.batch_size, n, url)
                 for n in args.workers]
    print_table(rows)


if __name__ == "__main__":
    main()
