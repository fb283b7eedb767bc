"""Candidates per minute with 1, 2 and 4 CPU workers on PostgreSQL vs. the single-process SQLite run.

A small problem: three tiny Llama checkpoints (the test fixtures' builder), task arithmetic with one weight
per parent, a perplexity task. Each worker is a separate process running `search.worker.run_worker`, with
Optuna's `Study.ask`, `Study.tell` and `Trial.set_user_attr` wrapped by a timer, so the storage overhead
per candidate is measured where it is paid. After every run the study is checked: candidates completed
(= the budget), lost (counted trials missing or still in flight: must be 0) and duplicates evaluated
(a genome evaluated twice: must be 0).

    python benchmarks/worker_throughput.py [--candidates 24] [--workers 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_llama
from postgres import postgres_server

EVALUATED = ("complete", "raced_out", "failed")


def write_problem(root: Path, parents: list[Path], candidates: int, storage: str | None, name: str) -> Path:
    """The evolve config and its task files (disjoint search and test splits)."""
    rng = random.Random(0)
    for split, low, high in (("search", 10, 99), ("test", 100, 999)):
        rows = [{"question": f"{a}+{b}=", "answer": str(a + b)}
                for a, b in ((rng.randint(low, high), rng.randint(10, 99)) for _ in range(48))]
        (root / f"sum_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "sum.yaml").write_text(yaml.safe_dump({
        "name": "sum", "data": {"search": "sum_search.jsonl", "test": "sum_test.jsonl"},
        "prompt": "{question}", "answer_field": "answer", "scorer": "perplexity"}))
    config = {
        "name": name, "base_model": str(parents[0]), "parents": [str(p) for p in parents[1:]],
        "method": "task_arithmetic", "genome": {"weight": {"bounds": [0.0, 1.5]}}, "objectives": [{"task": "sum.yaml"}],
        "budget": {"candidates": candidates, "population": 4}, "racing": {"enabled": False}, "optimizer": "random",
        "seed": 3, "batch_size": 16, "cpu_threads": 1,
    }
    if storage is not None:
        config["storage"] = storage
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def instrument() -> dict[str, float]:
    """Time every ask/tell/set_user_attr of this process; returns the live totals."""
    totals = {"seconds": 0.0, "calls": 0}

    def timed(function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals["seconds"] += time.perf_counter() - started
                totals["calls"] += 1
        return wrapper

    optuna.Study.ask = timed(optuna.Study.ask)
    optuna.Study.tell = timed(optuna.Study.tell)
    optuna.Trial.set_user_attr = timed(optuna.Trial.set_user_attr)
    return totals


def worker_process(url: str, study: str, index: int, results) -> None:
    from evomerge.search.worker import run_worker

    totals = instrument()
    done = run_worker(url, study=study, index=index, device="cpu")
    results.put((index, done, totals["seconds"]))


def check(study: optuna.Study, budget: int) -> tuple[int, int, int]:
    """(completed, lost, duplicates evaluated) of a finished study."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    counted = [t for t in trials if t.number not in retried and t.state.is_finished()]
    in_flight = sum(t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING) for t in trials)
    keys = Counter(t.user_attrs["genome_key"] for t in trials if t.user_attrs.get("status") in EVALUATED)
    duplicates = sum(count - 1 for count in keys.values())
    return len(counted), max(budget - len(counted), 0) + in_flight, duplicates


def run_sqlite(root: Path, parents: list[Path], candidates: int) -> dict:
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun, prepare_run_dir

    config_path = write_problem(root, parents, candidates, None, "sqlite")
    config, base = load_evolve_config(config_path)
    prepare_run_dir(config, root / "run_sqlite")
    run = SearchRun(config, base, root / "run_sqlite")
    run.open_study(x0=None)
    totals = instrument()
    started = time.perf_counter()
    while len(run.finished_trials()) < candidates:
        run.step()
    seconds = time.perf_counter() - started
    completed, lost, duplicates = check(run.study, candidates)
    return {"setup": "SQLite, 1 process", "workers": 1, "completed": completed, "lost": lost,
            "duplicates": duplicates, "seconds": seconds, "storage_s": totals["seconds"]}


def run_postgres(root: Path, parents: list[Path], candidates: int, workers: int, url: str) -> dict:
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun, prepare_run_dir
    from evomerge.search.worker import publish_config

    name = f"pg{workers}"
    config_path = write_problem(root, parents, candidates, url, name)
    config, base = load_evolve_config(config_path)
    prepare_run_dir(config, root / f"run_{name}")
    study = SearchRun(config, base, root / f"run_{name}").open_study(x0=None)
    publish_config(study, config, base)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = time.perf_counter()
    processes = [context.Process(target=worker_process, args=(url, name, i, results)) for i in range(workers)]
    for process in processes:
        process.start()
    reports = [results.get(timeout=1800) for _ in processes]
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started  # includes each worker's start-up (imports, parents loaded)
    completed, lost, duplicates = check(study, candidates)
    return {"setup": f"PostgreSQL, {workers} worker(s)", "workers": workers, "completed": completed, "lost": lost,
            "duplicates": duplicates, "seconds": seconds, "storage_s": sum(r[2] for r in reports),
            "per_worker": [r[1] for r in sorted(reports)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="worker-bench-"))
    parents = [make_llama(root / f"m{seed}", seed=seed) for seed in range(3)]
    rows = [run_sqlite(root, parents, args.candidates)]
    with postgres_server() as url:
        rows += [run_postgres(root, parents, args.candidates, n, url) for n in args.workers]
    print(f"{'setup':<24}{'cand/min':>10}{'completed':>11}{'lost':>6}{'dup eval':>10}{'storage s/cand':>16}  per worker")
    for row in rows:
        rate = 60 * row["completed"] / row["seconds"]
        print(f"{row['setup']:<24}{rate:>10.1f}{row['completed']:>11}{row['lost']:>6}{row['duplicates']:>10}"
              f"{row['storage_s'] / row['completed']:>16.4f}  {row.get('per_worker', [row['completed']])}")


if __name__ == "__main__":
    main()
