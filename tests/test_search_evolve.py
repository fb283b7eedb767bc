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
#: name -> (method, weight, density) of the untuned baselines a run with a base model compares against.
UNTUNED = {
    "task_arithmetic_uniform": ("task_arithmetic", 0.5, None),
    "ties_density0.5_weight0.5": ("ties", 0.5, 0.5),
    "ties_density0.5_weight1": ("ties", 1.0, 0.5),
    "dare_ties_density0.5_weight0.5": ("dare_ties", 0.5, 0.5),
    "dare_ties_density0.5_weight1": ("dare_ties", 1.0, 0.5),
}


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
    # The parents and baselines are fixed trials marked with `kind` (tests/test_optuna_study.py): not candidates.
    done = [t for t in study.trials if t.state.is_finished() and "kind" not in t.user_attrs]
    assert len(done) == BUDGET == outcome.candidates
    # CMA-ES samples the first candidate independently (it has no generation of its own and counts in the
    # first), then asks in generations of the population.
    assert "cma:generation" not in done[0].system_attrs
    generations = [t.user_attrs["generation"] for t in done]
    assert generations == [0] + [t.system_attrs["cma:generation"] for t in done[1:]] == [0] * 5 + [1] * 3
    for trial in done:
        attrs = trial.user_attrs
        assert recipe_of(TrialRecord.of(trial)).method == "dare_ties"
        if attrs["status"] in ("complete", "raced_out"):
            assert attrs["examples"] + attrs["examples_saved"] == 24
            score = attrs["scores"]["sum"]
            assert score["n"] == attrs["examples"]
            assert attrs["fitness"] == pytest.approx(score["score"])
            assert attrs["merge_seconds"] > 0 and attrs["eval_seconds"] > 0 and attrs["tokens"] > 0
            # Optuna's view: every racing round is an intermediate value at "examples scored so far".
            last_step = max(trial.intermediate_values)
            assert last_step == attrs["examples"]
            assert trial.intermediate_values[last_step] == pytest.approx(attrs["fitness"])
        if attrs["status"] == "raced_out":  # a partial score is never told as a complete one
            assert trial.state == optuna.trial.TrialState.PRUNED
            # Optuna itself may copy the last intermediate value onto a pruned trial; nothing else is told.
            assert trial.values in (None, [trial.intermediate_values[max(trial.intermediate_values)]])
        elif attrs["status"] == "complete":
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert trial.values == [pytest.approx(attrs["fitness"])]


def test_champion_is_the_best_fully_evaluated_candidate(finished_run):
    root, outcome = finished_run
    study = load_run(root / "run")[1].study
    best = max(RunStore(study).fully_evaluated(), key=lambda t: t.fitness)
    assert outcome.selection.champion == best.number
    results = outcome.test_results
    kinds = sorted(r["kind"] for r in results.values())
    assert kinds.count("parent") == 3 and kinds.count("baseline") == len(UNTUNED)
    champion = results[f"candidate:{best.number}"]
    assert "champion" in champion["roles"]
    assert champion["test"]["sum"]["n"] == 24
    summary = json.loads((root / "run" / "run.json").read_text())
    assert summary["selection"]["champion"] == best.number


def test_baselines_are_scored_once_and_stored(finished_run):
    root, _ = finished_run
    study = load_run(root / "run")[1].study
    baselines = study.user_attrs["baselines"]
    assert {name for name, b in baselines.items() if b["kind"] == "untuned"} == set(UNTUNED)
    assert sum(1 for b in baselines.values() if b["kind"] == "parent") == 3
    for record in baselines.values():
        assert record["search"]["sum"]["n"] == 24
    # The untuned settings are the ones people use (mergekit's example density 0.5), not density 1.
    for name, (method, weight, density) in UNTUNED.items():
        recipe = yaml.safe_load(baselines[name]["recipe"])
        assert recipe["method"] == method
        for entry in recipe["models"]:
            assert entry["parameters"].get("weight") == pytest.approx(weight)
            assert entry["parameters"].get("density") == density


def test_resuming_a_finished_run_adds_nothing(finished_run):
    root, outcome = finished_run
    again = evolve(root / "evolve.yaml", root / "run")
    assert again.candidates == outcome.candidates
    assert again.selection == outcome.selection


@pytest.mark.parametrize("start", ["init", "best_baseline"])
def test_cmaes_starts_where_the_config_says(finished_run, start, tmp_path):
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun
    from evomerge.search.store import prepare_run_dir

    root, _ = finished_run
    data = yaml.safe_load((root / "evolve.yaml").read_text())
    data["genome"]["weight"]["init"] = 0.3
    data["start"] = start
    data["baselines"] = {
        "mine": {"method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in data["parents"]]}
    }
    (root / f"start_{start}.yaml").write_text(yaml.safe_dump(data))
    config, config_root = load_evolve_config(root / f"start_{start}.yaml")
    prepare_run_dir(config, tmp_path / "run")
    run = SearchRun(config, config_root, tmp_path / "run")
    x0 = run.start()
    assert "mine" in run.store.baselines  # the config's own baseline is scored with the others
    weights = {name: value for name, value in x0.items() if name.startswith("weight.")}
    if start == "init":
        assert x0 == run.genome.initial()
        assert set(weights.values()) == {0.3}
    else:  # the best parent the genome can express: one task vector at weight 1, the other at 0
        best = max((b for b in run.store.baselines.values() if "genome" in b), key=lambda b: b["fitness"])
        assert x0 == best["genome"]
        assert sorted(set(weights.values())) == [0.0, 1.0]


def test_paper_genome_preset_has_weight_and_density_per_layer_with_separate_io_groups(finished_run, tmp_path):
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun

    root, _ = finished_run
    data = yaml.safe_load((root / "evolve.yaml").read_text()) | {"genome": "paper"}
    (root / "paper.yaml").write_text(yaml.safe_dump(data))
    config, config_root = load_evolve_config(root / "paper.yaml")
    genome = SearchRun(config, config_root, tmp_path / "run").genome
    groups = {gene.group for gene in genome.genes}
    # The tiny parents have 4 layers: layers 0-3 plus the input embeddings and the output head.
    assert groups == {"layer0", "layer1", "layer2", "layer3", "input", "output"}
    assert len(genome) == 2 * 2 * 6  # weight and density x two parents x six groups
    assert set(genome.initial().values()) == {0.5}
