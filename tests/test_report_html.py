"""The evolution report: its data checked against the trials, and the HTML against its sections."""

from __future__ import annotations

import re
import statistics

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.flow import PathSpec
from evomerge.models import Checkpoint
from evomerge.report.data import (
    coefficient_grids,
    final_population,
    generation_stats,
    genome_projection,
    hypervolume,
    load_run_data,
    pareto_fronts,
    reference_lines,
    trial_history,
)
from evomerge.report.figures import path_figure
from evomerge.report.html import write_report
from evomerge.search import TrialRecord, load_run, recipe_of

# A 4-candidate run: too few for parameter importance, so its section is a note and Optuna's other views
# (which follow the most important genes) are left out.
SECTIONS = ("summary", "fitness", "history", "task-scores", "importance", "projection", "coefficients", "results",
            "lineage")


def test_generation_stats_are_best_so_far_and_median_of_complete_trials(lineage_runs):
    study = load_run(lineage_runs["run_a"])[1].study
    stats = generation_stats(load_run_data(lineage_runs["run_a"]))
    complete = [t for t in study.get_trials() if t.user_attrs.get("status") == "complete"]
    assert stats["fitness"]["generation"] == [0, 1]  # whole generations, for integer ticks
    for i, generation in enumerate(stats["fitness"]["generation"]):
        fitness = [t.user_attrs["fitness"] for t in complete if t.user_attrs["generation"] == generation]
        so_far = [t.user_attrs["fitness"] for t in complete if t.user_attrs["generation"] <= generation]
        assert stats["fitness"]["best_so_far"][i] == max(so_far)
        assert stats["fitness"]["median"][i] == statistics.median(fitness)
    # One objective: its task's curve would only hide under the fitness curve, so it is not drawn twice.
    assert list(stats) == ["fitness"]


def test_reference_lines_are_the_best_parent_and_untuned_merge(lineage_runs):
    data = load_run_data(lineage_runs["run_a"])
    baselines = load_run(lineage_runs["run_a"])[1].baselines
    parents = {n: b["fitness"] for n, b in baselines.items() if b["kind"] == "parent"}
    untuned = {n: b["fitness"] for n, b in baselines.items() if b["kind"] == "untuned" and b["fitness"] is not None}
    best_parent, best_untuned = max(parents, key=parents.get), max(untuned, key=untuned.get)
    assert reference_lines(data) == {
        f"best parent ({best_parent.removeprefix('parent:')})": parents[best_parent],
        f"best untuned merge ({best_untuned})": untuned[best_untuned],
    }


def test_history_is_every_scored_trial_with_the_best_complete_so_far(lineage_runs):
    data = load_run_data(lineage_runs["run_a"])
    scored, best = trial_history(data)
    assert [c.number for c in scored] == sorted(c.number for c in data.candidates if c.fitness is not None)
    for i, candidate in enumerate(scored):
        earlier = [c.fitness for c in scored[: i + 1] if c.fully_evaluated]
        assert best[i] == max(earlier)


def test_final_population_skips_a_partial_last_generation(lineage_runs):
    import dataclasses

    data = load_run_data(lineage_runs["run_a"])
    assert final_population(data)[0] == 1  # two full generations of two
    # A third generation with one of its two candidates told so far: the population shown stays generation 1.
    straggler = dataclasses.replace(data.complete[0], number=4, generation=2)
    partial = dataclasses.replace(data, candidates=[*data.candidates, straggler])
    generation, population = final_population(partial)
    assert generation == 1 and {c.number for c in population} == {c.number for c in data.complete if c.generation == 1}


def test_hypervolume_is_the_dominated_area():
    # Two points (1, 2) and (2, 1) over (0, 0): two 1x2 boxes sharing a 1x1 square.
    assert hypervolume([[1, 2], [2, 1]], [0, 0]) == 3
    # Three unit-thickness slabs in 3-D: 3 x 2 - 3 x 1 + 1 (inclusion-exclusion).
    assert hypervolume([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0]) == 4
    assert hypervolume([[1, 1], [0.5, 0.5]], [0, 0]) == 1  # a dominated point adds nothing
    assert hypervolume([[-1, 5]], [0, 0]) == 0  # nothing above the reference point


def test_projection_variance_matches_the_covariance_eigenvalues(lineage_runs):
    import numpy as np

    data = load_run_data(lineage_runs["run_a"])
    projection = genome_projection(data)
    names = [g["name"] for g in data.genes]
    low = np.array([g["low"] for g in data.genes])
    span = np.array([g["high"] - g["low"] for g in data.genes])
    x = (np.array([[c.genes[n] for n in names] for c in data.candidates]) - low) / span
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    assert np.allclose(projection.coords.var(axis=0, ddof=1), eigenvalues[:2], atol=1e-9)
    assert np.allclose(projection.explained, eigenvalues[:2] / eigenvalues.sum(), atol=1e-9)


def test_pareto_fronts_are_cumulative_and_non_dominated(lineage_runs):
    data = load_run_data(lineage_runs["run_a"])
    fronts = pareto_fronts(data)
    last = max(fronts)
    best = max(c.scores["add"] for c in data.complete)
    assert {c.number for c in data.complete if c.scores["add"] == best} == set(fronts[last])


def test_coefficient_heatmap_holds_the_recipes_per_layer_weights(lineage_runs):
    study = load_run(lineage_runs["run_a"])[1].study
    trial = study.get_trials()[study.user_attrs["selection"]["champion"]]
    recipe = recipe_of(TrialRecord.of(trial))
    (weight, density) = coefficient_grids(recipe, Checkpoint.open(lineage_runs["base"]))
    assert weight.param == "weight" and density.param == "density"
    assert weight.columns == ["embed", "L0", "L1", "L2", "L3", "out"]
    raw = yaml.safe_load(trial.user_attrs["recipe"])
    for row, model in enumerate(raw["models"]):
        rules = {r["filter"]: r["value"] for r in model["parameters"]["weight"]}
        for layer in range(4):
            expected = rules[f"model.layers.{layer}."]
            column = weight.columns.index(f"L{layer}")
            # Every tensor of the layer used exactly the rule's value; the cell is their mean.
            assert weight.low[row][column] == weight.high[row][column] == expected
            assert weight.values[row][column] == pytest.approx(expected, rel=1e-12)
        assert weight.low[row][0] == weight.high[row][0] == rules["model.embed_tokens.weight"]
        assert density.values[row] == pytest.approx([model["parameters"]["density"]] * 6, rel=1e-12)


def test_report_has_every_section_and_needs_no_network(lineage_runs, tmp_path):
    result = write_report(lineage_runs["run_b"], tmp_path / "report.html")
    assert result.sections == list(SECTIONS)
    text = result.path.read_text()
    for section in SECTIONS:
        assert f"<section id='{section}'>" in text
    for section in SECTIONS[1:]:
        if section not in ("results", "importance"):
            assert f'id="fig-{section}"' in text
    assert "Parameter importance needs at least 10 fully evaluated candidates; this run has 4." in text
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js is inline, once
    assert text.count("plotly.js v") >= 1 and len(text) > 3_000_000
    assert "candidate:" in text and "parent:" in text and "task_arithmetic_uniform" in text
    assert "compatible: 3 model(s)" in text
    # The start and every untuned baseline's settings are on the page, not only their names.
    assert "init: every gene at its configured init (the paper&#x27;s start)" in text
    assert "dare_ties: " in text and "density=0.5" in text


def test_report_of_a_run_without_selection_shows_the_best_so_far(lineage_runs, tmp_path):
    import shutil

    from evomerge.search import load_run as reload

    copy = tmp_path / "running"
    shutil.copytree(lineage_runs["run_a"], copy)
    config, _ = reload(copy)
    # Simulate a run still searching: no selection, no test scores yet.
    from optuna.storages import RDBStorage

    storage = RDBStorage(f"sqlite:///{copy / 'study.db'}")
    study_id = storage.get_study_id_from_name(config.name)
    for key in ("selection", "test_results"):
        storage.set_study_user_attr(study_id, key, None)
    data = load_run_data(copy)
    best = max(data.complete, key=lambda c: (c.fitness, -c.number))
    text = write_report(copy, tmp_path / "r.html").path.read_text()
    assert data.champion == best.number
    assert "champion so far" in text and "Test-split scores appear once the run has finished." in text


def test_path_figure_shows_each_step_of_a_layer_path():
    spec = PathSpec(layers_per_source=(2, 2), steps=((0, 0), (1, 1), (0, 1)), scales=(1.0, 0.5, 2.0),
                    source_names=("a", "b"))
    from evomerge.flow import path_figure_data

    fig = path_figure(path_figure_data(spec))
    markers = {trace.name: list(trace.x) for trace in fig.data if trace.mode == "markers"}
    assert markers == {"a": [0, 2], "b": [1]}


def test_cli_writes_report_and_pngs(lineage_runs, tmp_path):
    import shutil

    if shutil.which("chromium") is None:
        pytest.skip("PNG export needs Chromium (apt-get install chromium)")
    result = CliRunner().invoke(app, ["report", str(lineage_runs["run_a"]), "--out", str(tmp_path / "r.html"),
                                      "--png-dir", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == sorted(f"{s}.png" for s in SECTIONS[1:] if s not in ("results", "importance"))
    for png in (tmp_path / "png").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
