"""Crash-safety and many workers, as real scenarios: separate processes, real signals, a real PostgreSQL server.

Every scenario checks the run's history against what must hold whatever the timing: each trial that was
told stays told with the same values, the budget is spent exactly, and no genome is evaluated twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_forkserver import CliProcess, CliServer
from conftest import write_sum_task
from evomerge.pipelines import evolve
from evomerge.search.config import load_evolve_config
from evomerge.search.run import SearchRun
from evomerge.search.store import RunStore, prepare_run_dir
from postgres import postgres_server

EVALUATED = ("complete", "raced_out", "failed")  # statuses of trials that really ran an evaluation


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session (installed with apt when missing)."""
    with postgres_server() as url:
        yield url


def write_problem(root: Path, parents: list[Path], *, candidates: int, examples: int = 24, storage: str | None = None,
                  method: str = "task_arithmetic", name: str = "w") -> Path:
    """A tiny search: two task vectors over a base, one weight per parent, a perplexity task."""
    write_sum_task(root, examples)
    config = {
        "name": name, "base_model": str(parents[0]), "parents": [str(p) for p in parents[1:]], "method": method,
        "genome": {"weight": {"bounds": [0.0, 1.5]}}, "objectives": [{"task": "sum.yaml"}],
        "budget": {"candidates": candidates, "population": 4}, "racing": {"enabled": False},
        "optimizer": "random", "seed": 3, "batch_size": 8,
    }
    if storage is not None:
        config["storage"] = storage
    path = root / "evolve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def coordinate(config_path: Path, run_dir: Path) -> optuna.Study:
    """The coordinator's bookkeeping without baselines: the study exists and holds the frozen config."""
    config, root = load_evolve_config(config_path)
    prepare_run_dir(config, run_dir)
    run = SearchRun(config, root, run_dir)
    study = run.open_study(x0=None)
    RunStore(study).publish_config(config, root)
    return study


def start_worker(cli: CliServer, target: str, study: str, index: int) -> CliProcess:
    """`evomerge worker` in its own process (one torch thread), as a user on another machine starts it."""
    args = ["worker", target, "--study", study, "--index", str(index), "--heartbeat", "1", "--grace", "3"]
    return cli.start(args, Path.cwd(), timeout=240)


def finish(process: CliProcess) -> None:
    assert process.wait() == 0, process.output()[1][-2000:]


def evaluated_keys(trials: list[optuna.trial.FrozenTrial]) -> Counter:
    return Counter(t.user_attrs["genome_key"] for t in trials if t.user_attrs.get("status") in EVALUATED)


def assert_history_complete(study: optuna.Study, budget: int) -> None:
    """Budget spent exactly, nothing left in flight, no genome evaluated twice, duplicates point at their originals."""
    # A finished run also holds its parents and baselines as fixed trials marked with `kind`: not candidates.
    trials = [t for t in study.get_trials(deepcopy=False) if "kind" not in t.user_attrs]
    states = Counter(t.state for t in trials)
    assert states[optuna.trial.TrialState.RUNNING] == 0 and states[optuna.trial.TrialState.WAITING] == 0
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    retried |= {t.user_attrs["requeued_from"] for t in trials if "requeued_from" in t.user_attrs}
    counted = [t for t in trials if t.number not in retried]
    assert len(counted) == budget
    assert all(t.user_attrs.get("status") in (*EVALUATED, "duplicate") for t in counted)
    # A trial killed in flight may have written its scores before its result was told; it was re-queued,
    # so only the trials that count may not share a genome.
    assert max(evaluated_keys(counted).values()) == 1
    by_number = {t.number: t for t in trials}
    for trial in counted:
        if trial.user_attrs["status"] == "duplicate":
            original = by_number[trial.user_attrs["duplicate_of"]]
            assert original.user_attrs["genome_key"] == trial.user_attrs["genome_key"]
            assert original.values == trial.values


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and return once it is really stopped (the signal is delivered asynchronously)."""
    os.kill(pid, signal.SIGSTOP)
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        time.sleep(0.001)


def kill_mid_candidate(victim: CliProcess, study: optuna.Study, timeout: float = 120) -> optuna.trial.FrozenTrial:
    """SIGKILL `victim` while it has a candidate in flight; returns that candidate's trial.

    A candidate on a tiny model lasts a fraction of a second, so polling the database and then killing
    can land after the result was told. Instead the victim is frozen first, then the database is read:
    a trial seen running there is still running when the kill lands. Otherwise the victim resumes and
    is sampled again a moment later.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if victim.poll() is not None:
            raise AssertionError(f"the worker ended (exit {victim.returncode}) before it could be killed "
                                 f"mid-candidate: {victim.output()}")
        freeze(victim.pid)
        time.sleep(0.05)  # a commit the victim sent just before it stopped is applied by the server first
        in_flight = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if "recipe" in t.user_attrs]
        if in_flight:
            victim.kill()
            assert victim.wait() == -signal.SIGKILL
            return in_flight[0]
        os.kill(victim.pid, signal.SIGCONT)
        time.sleep(0.02)
    raise AssertionError(f"the worker had no candidate in flight within {timeout} s")


def test_killed_worker_candidate_is_requeued_and_completed_elsewhere(tiny_llama, tmp_path, postgres_url, evomerge_cli):
    # Many examples keep each candidate in flight longer, so the first samples already find one.
    config_path = write_problem(tmp_path, [tiny_llama(0), tiny_llama(1), tiny_llama(2)], candidates=3,
                                examples=400, storage=postgres_url, name="killed")
    study = coordinate(config_path, tmp_path / "run")
    killed = kill_mid_candidate(start_worker(evomerge_cli, postgres_url, "killed", 0), study)
    finish(start_worker(evomerge_cli, postgres_url, "killed", 1))

    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if killed.number in t.system_attrs.get("retry_history", ())]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    before = [t for t in trials.values() if t.number < killed.number]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in before)  # nothing else lost
    assert_history_complete(study, 3)


def test_four_workers_share_one_study_without_loss_or_double_evaluation(tiny_llama, tmp_path, postgres_url,
                                                                        evomerge_cli):
    config_path = write_problem(tmp_path, [tiny_llama(0), tiny_llama(1), tiny_llama(2)], candidates=10,
                                storage=postgres_url, name="four")
    study = coordinate(config_path, tmp_path / "run")
    # The same genome queued three times: exactly one worker may evaluate it; the others copy its result.
    twin = {f"weight.{tiny_llama(1).name}.all": 0.25, f"weight.{tiny_llama(2).name}.all": 0.75}
    for _ in range(3):
        study.enqueue_trial(twin, skip_if_exists=False)
    workers = [start_worker(evomerge_cli, postgres_url, "four", index) for index in range(4)]
    for worker in workers:
        finish(worker)
    # Each ask spends a reserved budget slot, so four racing workers still stop at exactly the budget.
    assert_history_complete(study, 10)
    twins = [t for t in study.get_trials() if t.params == twin]
    assert sorted(t.user_attrs["status"] for t in twins) == ["complete", "duplicate", "duplicate"]
    devices = Counter(t.user_attrs.get("device") for t in study.get_trials() if t.user_attrs.get("status") == "complete")
    assert devices == Counter({"cpu": sum(devices.values())})


def test_coordinator_killed_repeatedly_then_resumed_loses_nothing(tiny_llama, tmp_path, evomerge_cli):
    budget = 9
    config_path = write_problem(tmp_path, [tiny_llama(0), tiny_llama(1), tiny_llama(2)], candidates=budget)
    run_dir = tmp_path / "run"
    url = f"sqlite:///{run_dir / 'study.db'}"
    rng = random.Random(11)
    told: dict[int, tuple] = {}
    for kill in range(3):
        process = evomerge_cli.start(["evolve", str(config_path), "--run", str(run_dir)], tmp_path)
        target = len(told) + 1 + rng.randint(0, 1)  # a random point: after one or two more candidates
        while process.poll() is None:
            time.sleep(0.1)
            try:
                trials = optuna.load_study(study_name="w", storage=url).get_trials(deepcopy=False)
            except (KeyError, sqlalchemy.exc.OperationalError):  # the study (or its tables) may not exist yet
                trials = []
            if sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= target:
                time.sleep(rng.uniform(0, 0.5))
                break
        process.kill()
        process.wait()
        study = optuna.load_study(study_name="w", storage=url)
        for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
            # Whatever was told before a kill is never re-told differently afterwards.
            assert told.setdefault(trial.number, tuple(trial.values)) == tuple(trial.values)
    code, _, err = evomerge_cli.run(["evolve", str(config_path), "--run", str(run_dir)], tmp_path)
    assert code == 0, err[-2000:]
    study = optuna.load_study(study_name="w", storage=url)
    final = {t.number: tuple(t.values) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))}
    assert all(final[number] == values for number, values in told.items())
    assert_history_complete(study, budget)
    assert json.loads((run_dir / "run.json").read_text())["candidates"] == budget


def test_nan_recipe_is_recorded_failed_and_the_run_goes_on(tiny_llama, tmp_path):
    # A parent whose task vector overflows float32 at weight 1.5 (3e38 * 1.5 = inf) but not at 0.5.
    hot = tmp_path / "hot"
    shutil.copytree(tiny_llama(1), hot)
    tensors = load_file(hot / "model.safetensors")
    tensors["model.norm.weight"] = torch.full_like(tensors["model.norm.weight"], 3e38)
    save_file(tensors, hot / "model.safetensors", metadata={"format": "pt"})
    config_path = write_problem(tmp_path, [tiny_llama(0), hot, tiny_llama(2)], candidates=3)
    config, root = load_evolve_config(config_path)
    prepare_run_dir(config, tmp_path / "run")
    study = SearchRun(config, root, tmp_path / "run").open_study(x0=None)
    hot_gene, other = "weight.hot.all", f"weight.{tiny_llama(2).name}.all"  # genes are named by parent directory
    study.enqueue_trial({hot_gene: 1.5, other: 0.5})  # inf in the merged weights
    study.enqueue_trial({hot_gene: 0.0, other: 0.5})  # the hot task vector switched off
    evolve(config_path, tmp_path / "run")
    trials = [t for t in study.get_trials() if "kind" not in t.user_attrs]  # candidates, not the fixed references
    assert trials[0].state == optuna.trial.TrialState.FAIL and trials[0].user_attrs["status"] == "failed"
    assert "finite" in trials[0].user_attrs["failure"].lower()
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].user_attrs["status"] == "complete"
    # A random third candidate either overflows in the forward pass (failed, with the reason) or completes.
    third = trials[2].user_attrs
    assert third["status"] == "complete" or "non-finite" in third["failure"]
    assert len(trials) == 3
    # The hot parent scored NaN: Optuna holds only finite values, so its reference trial is a failed one.
    references = {t.user_attrs["name"]: t for t in study.get_trials() if "kind" in t.user_attrs}
    assert references["parent:hot"].state == optuna.trial.TrialState.FAIL and references["parent:hot"].values is None


def test_changed_parent_is_refused_on_resume_unless_accepted(tiny_llama, tmp_path, evomerge_cli):
    parent = tmp_path / "parent"
    shutil.copytree(tiny_llama(1), parent)
    config_path = write_problem(tmp_path, [tiny_llama(0), parent, tiny_llama(2)], candidates=1)

    def evolve_cli(*extra: str) -> tuple[int, str]:
        code, _, err = evomerge_cli.run(["evolve", str(config_path), "--run", str(tmp_path / "run"), *extra], tmp_path)
        return code, err

    assert evolve_cli()[0] == 0
    # Same weights rewritten (new mtime): the fingerprint differs, the content does not — accepted silently.
    tensors = load_file(parent / "model.safetensors")
    save_file(tensors, parent / "model.safetensors", metadata={"format": "pt"})
    assert evolve_cli()[0] == 0
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, parent / "model.safetensors", metadata={"format": "pt"})
    code, err = evolve_cli()
    assert code == 2
    assert "changed since run" in err and "--accept-changed-parents" in err
    assert "Traceback" not in err
    code, err = evolve_cli("--accept-changed-parents")
    assert code == 0, err[-2000:]


@pytest.mark.parametrize("scheme", ["postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://"])
def test_every_documented_postgresql_url_form_opens_the_study_database(postgres_url, scheme):
    """SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the [postgres] extra installs both drivers."""
    from evomerge.search.coordination import open_storage

    url = scheme + postgres_url.split("://", 1)[1]
    storage = open_storage(url)
    name = f"forms-{scheme.split(':')[0].replace('+', '-')}"
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(study_name=name, storage=url).trials) >= 1
