"""A small evolve end to end on tiny real checkpoints: history, selection, test scoring, export."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from conftest import write_sum_task
from evomerge.pipelines import evolve
from evomerge.search import RunStore, TrialRecord, load_run, recipe_of

BUDGET = 8


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("evolve")
    write_sum_task(root, examples=24)
    config = {
        "name": "small",
        "base_model": str(tiny_llama(0)),
        "parents": [str(tiny_llama(1)), str(tiny_llama(2))],
        "method": "dare_ties",
        "genome": {
            "weight": {"bounds": [0.0, 1.0], "granularity": "per_block", "block_size": 2},
            "density": {"bounds": [0.2, 1.0]},
        },
        "objectives": [{"task": "sum.yaml"}],
        "budget": {"candidates": BUDGET, "population": 4},
        "racing": {"first_fraction": 0.5},
        "seed": 7,
        "intended_use": "tests",
    }
    (root / "evolve.yaml").write_text(yaml.safe_dump(config))
    outcome = evolve(root / "evolve.yaml", root / "run")
    return root, outcome


def test_history_records_every_candidate(finished_run):
    root, outcome = finished_run
    study = load_run(root / "run")[1].study
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    assert len(done) == BUDGET == outcome.candidates
    for trial in done:
        attrs = trial.user_attrs
        assert attrs["generation"] == trial.number // 4
        assert recipe_of(TrialRecord.of(trial)).method == "dare_ties"
        if attrs["status"] in ("complete", "raced_out"):
            assert attrs["examples"] + attrs["examples_saved"] == 24
            score = attrs["scores"]["sum"]
            assert score["n"] == attrs["examples"]
            assert attrs["fitness"] == pytest.approx(score["score"])
            assert trial.values == [pytest.approx(attrs["fitness"])]
            assert attrs["merge_seconds"] > 0 and attrs["eval_seconds"] > 0 and attrs["tokens"] > 0


def test_champion_is_the_best_fully_evaluated_candidate(finished_run):
    root, outcome = finished_run
    study = load_run(root / "run")[1].study
    best = max(RunStore(study).fully_evaluated(), key=lambda t: t.fitness)
    assert outcome.selection.champion == best.number
    results = outcome.test_results
    kinds = sorted(r["kind"] for r in results.values())
    assert kinds.count("parent") == 3 and kinds.count("baseline") == 3
    champion = results[f"candidate:{best.number}"]
    assert "champion" in champion["roles"]
    assert champion["test"]["sum"]["n"] == 24
    summary = json.loads((root / "run" / "run.json").read_text())
    assert summary["selection"]["champion"] == best.number


def test_baselines_are_scored_once_and_stored(finished_run):
    root, _ = finished_run
    study = load_run(root / "run")[1].study
    baselines = study.user_attrs["baselines"]
    assert {"task_arithmetic_uniform", "ties_defaults", "dare_ties_defaults"} <= set(baselines)
    assert sum(1 for b in baselines.values() if b["kind"] == "parent") == 3
    for record in baselines.values():
        assert record["search"]["sum"]["n"] == 24


def test_resuming_a_finished_run_adds_nothing(finished_run):
    root, outcome = finished_run
    again = evolve(root / "evolve.yaml", root / "run")
    assert again.candidates == outcome.candidates
    assert again.selection == outcome.selection
