"""The run is an Optuna-native study: what a user of plain Optuna (the dashboard, `optuna.visualization`,
`get_param_importances`) sees when opening the demo's study without evomerge."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.pipelines import evolve
from evomerge.pipelines.demo import demo_config, run_demo
from evomerge.search import RunStore, find_trial

CANDIDATES = 40


def open_study(run: Path) -> optuna.Study:
    name = yaml.safe_load((run / "config.yaml").read_text())["name"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run / 'study.db'}")


@pytest.fixture(scope="module")
def demo_study(zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("optuna_demo")
    outcome, _ = run_demo(out, candidates=CANDIDATES, zoo_dir=zoo.root)
    return out, outcome, open_study(out / "run")


@pytest.fixture(scope="module")
def raced_study(zoo, tmp_path_factory):
    """The demo's search with racing tight enough (z = 0.5 against the single best) that it drops some of 40
    candidates on any zoo build; at the demo's defaults that depends on the build's weights."""
    out = tmp_path_factory.mktemp("optuna_raced")
    config = demo_config(zoo, candidates=CANDIDATES) | {"racing": {"confidence": 0.5, "top_k": 1}}
    (out / "evolve.yaml").write_text(yaml.safe_dump(config))
    evolve(out / "evolve.yaml", out / "run")
    return open_study(out / "run")


def candidates_of(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if "kind" not in t.user_attrs]


def test_raced_out_candidates_are_pruned_with_their_rounds_as_intermediate_values(raced_study):
    study = raced_study
    trials = candidates_of(study)
    assert len(trials) == CANDIDATES
    raced = [t for t in trials if t.user_attrs["status"] == "raced_out"]
    assert raced, "tight racing drops some of 40 candidates"
    for trial in raced:
        assert trial.state == optuna.trial.TrialState.PRUNED
        steps = sorted(trial.intermediate_values)
        # One value per racing round, at the number of examples scored so far; the last is what it reached.
        assert steps[-1] == trial.user_attrs["examples"] < trial.user_attrs["examples"] + trial.user_attrs["examples_saved"]
        assert trial.intermediate_values[steps[-1]] == pytest.approx(trial.user_attrs["fitness"])
        # Optuna's own convention for a pruned trial: its value is the last intermediate value.
        assert trial.values == [trial.intermediate_values[steps[-1]]]
    for trial in trials:
        if trial.user_attrs["status"] == "complete":
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [trial.user_attrs["fitness"]]


def test_metric_names_and_parent_named_parameters(demo_study, zoo):
    _, _, study = demo_study
    assert study.metric_names == ["fitness"]
    specialists = {Path(path).name for path in zoo.specialists.values()}  # math, language, strings
    for trial in candidates_of(study):
        parents = {name.split(".")[1] for name in trial.params}
        assert parents == specialists, sorted(trial.params)[:4]
    # The demo's genome: a weight per layer group and a density per parent, e.g. `weight.math.layer0`.
    names = set(candidates_of(study)[0].params)
    assert {f"weight.{p}.layer0" for p in specialists} <= names and {f"density.{p}.all" for p in specialists} <= names


def test_parents_and_baselines_are_fixed_trials_no_reader_mistakes_for_candidates(demo_study):
    out, outcome, study = demo_study
    baselines = json.loads((out / "run" / "run.json").read_text())["baselines_search"]
    references = [t for t in study.trials if "kind" in t.user_attrs]
    assert sorted(t.user_attrs["name"] for t in references) == sorted(baselines)
    for trial in references:
        record = baselines[trial.user_attrs["name"]]
        assert trial.user_attrs["kind"] == record["kind"] and trial.params == {}
        if record["fitness"] is None:  # an untuned merge that could not be scored
            assert trial.state == optuna.trial.TrialState.FAIL
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.values == [record["fitness"]]
    assert sum(t.user_attrs["kind"] == "parent" for t in references) == 4  # base + three specialists
    # Added once the budget was spent: every candidate was sampled before any of them existed.
    assert min(t.number for t in references) > max(t.number for t in candidates_of(study))
    # The run store's readers see candidates only: selection, counting, look-up by number.
    store = RunStore(study)
    assert len(store.counted_trials()) == outcome.candidates == CANDIDATES
    assert {r.number for r in store.trials()} == {t.number for t in candidates_of(study)}
    assert store.champion() == outcome.selection.champion
    with pytest.raises(Exception, match="not a trial number"):
        find_trial(store, str(references[0].number))


def test_optuna_importance_runs_on_the_candidates(demo_study):
    _, _, study = demo_study
    # Reference trials have no parameters, so Optuna's evaluators (which keep trials holding every
    # parameter asked about) use the candidates only.
    params = sorted(candidates_of(study)[0].params)[:5]
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importances = optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)
    assert set(importances) == set(params) and sum(importances.values()) == pytest.approx(1.0)


def test_the_report_shows_optunas_views_of_the_same_study(demo_study):
    from evomerge.report import optuna_views
    from evomerge.report.data import load_run_data

    out, _, study = demo_study
    data = load_run_data(out / "run")
    names = [gene["name"] for gene in data.genes]
    scores, why = optuna_views.importance(data)
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0, **optuna_views.FOREST)
    expected = optuna.importance.get_param_importances(study, evaluator=evaluator, params=names)
    assert why == "" and scores == pytest.approx(dict(expected))
    text = (out / "report.html").read_text()  # the demo writes its report
    for section in ("fitness", "history", "task-scores", "importance", "parallel", "slice"):
        assert f'<div id="fig-{section}" class="plotly-graph-div"' in text, section
