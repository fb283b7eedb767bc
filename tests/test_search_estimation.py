"""Estimated fitness in a real search on the tiny zoo: anchors, estimates, audits, champion on full scores."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_task_files
from evomerge.errors import ConfigError
from evomerge.pipelines.demo import demo_config
from evomerge.report.extras import extra_sections
from evomerge.search.config import parse_evolve_config
from evomerge.search.estimation import split_examples
from evomerge.search.irt import estimate_ability, fit_2pl, predicted_accuracy
from evomerge.search.run import SearchRun
from evomerge.search.store import COMPLETE, ESTIMATED, prepare_run_dir


def test_anchors_are_shared_in_proportion_to_the_splits():
    assert split_examples(30, {"a": 300, "b": 100}) == {"a": 22, "b": 8}
    assert split_examples(2, {"a": 1000, "b": 3}) == {"a": 2, "b": 1}  # every task keeps one anchor


def test_an_estimated_fitness_needs_one_weighted_objective(tmp_path, zoo):
    data = demo_config(zoo) | {
        "objectives": [{"task": str(zoo.tasks["add"])}, {"task": str(zoo.tasks["reverse"])}],
        "combine": "pareto", "fitness": {"estimator": "irt"},
    }
    with pytest.raises(ConfigError, match="fitness"):
        parse_evolve_config(data, source="evolve.yaml", root=tmp_path)


def test_irt_search_estimates_audits_and_chooses_the_champion_on_full_scores(tmp_path, zoo):
    data = demo_config(zoo, candidates=10, seed=0) | {
        "racing": {"enabled": False},
        "fitness": {"estimator": "irt", "examples": 24, "warmup": 2, "audit_every": 5, "audit_top_k": 2},
    }
    config, root = parse_evolve_config(data, source="evolve.yaml", root=tmp_path)
    prepare_run_dir(config, tmp_path / "run")
    run = SearchRun(config, root, tmp_path / "run")
    run.run()
    records = run.store.counted_trials()
    audits = run.store.audits
    anchors = run.estimator.anchors
    assert sum(map(len, anchors.values())) == 24
    warm = [r for r in records if r.number < 2]
    assert all(r.status == COMPLETE and r.examples == 300 for r in warm)
    estimated = [r for r in records if r.number >= 2 and r.number not in audits]
    assert estimated and all(r.status == ESTIMATED and r.examples == 24 for r in estimated)
    # Audits after 5 and after 10 candidates score what is new among the two best estimates (warm-up
    # candidates rank too and need none); auditing
    # again with no new candidate scores nothing (the run's final audit, a resumed finished run).
    assert len(audits) <= 4
    assert run.audit() == []
    for number, audit in audits.items():
        record = next(r for r in records if r.number == number)
        assert record.status == COMPLETE and record.fitness == audit["fitness"] and record.examples == 324
        assert record.values == [record.estimate["fitness"]]  # the optimizer was told the estimate
    # The report's estimate-error table lists exactly the candidates scored both ways.
    ((section_id, _, body, _),) = extra_sections(run.store)
    assert section_id == "estimation" and body.count("<tr>") == 1 + len(warm) + len(audits)
    champion = next(r for r in run.store.trials() if r.number == run.store.champion())
    assert champion.fully_evaluated and champion.scores["target"]["n"] == 300
    # The first estimate (before any audit) is the IRT prediction recomputed independently from the stored
    # rows it was fitted on: parents first, then the untuned merges, then the two warm-up candidates.
    baselines = run.store.baselines.values()
    rows = [b["search"]["target"]["values"] for b in baselines if b["kind"] == "parent"]
    parents = len(rows)
    rows += [b["search"]["target"]["values"] for b in baselines if b["kind"] != "parent" and b["search"]]
    rows += [r.scores["target"]["values"] for r in warm]
    fit = fit_2pl(np.array(rows))
    first = next(r for r in records if r.number == 2)
    items = np.array(anchors["target"])
    run.session.activate_candidate(run.session.candidate_of(first))
    answers = np.array(run.session.evaluate("search", {"target": list(items)}).scores["target"].values)
    theta = estimate_ability(fit, items, answers, prior_mean=float(fit.theta[:parents].mean()),
                             prior_sd=max(1.0, float(fit.theta.std())))
    assert first.estimate["fitness"] == pytest.approx(predicted_accuracy(fit, items, answers, theta), abs=1e-9)


@pytest.mark.parametrize("answers", ["likelihood", "margin"])
def test_graded_anchors_tell_every_candidate_its_graded_estimate(tmp_path, zoo, answers):
    """Graded anchor answers (`likelihood`: reference-answer probabilities; `margin`: each reference token's
    race against its strongest rival): one forward pass, no generation; warm-up candidates add that pass to
    their full scores, the optimizer is told the estimate for every candidate, and the champion is still
    chosen on full scores."""
    data = demo_config(zoo, candidates=8, seed=1) | {
        "racing": {"enabled": False},
        "fitness": {"estimator": "irt", "examples": 20, "warmup": 2, "anchor_answers": answers},
    }
    config, root = parse_evolve_config(data, source="evolve.yaml", root=tmp_path)
    prepare_run_dir(config, tmp_path / "run")
    run = SearchRun(config, root, tmp_path / "run")
    run.run()
    records = run.store.counted_trials()
    assert all(r.values == [r.estimate["fitness"]] and r.estimate["answers"] == answers for r in records)
    warm = [r for r in records if r.number < 2]
    assert all(r.status == COMPLETE and r.examples == 300 + 20 for r in warm)
    estimated = [r for r in records if r.status == ESTIMATED]
    assert estimated and all(r.examples == 20 and r.scores["target"]["tokens"] > 0 for r in estimated)
    # The anchors' graded answers, recomputed by the engine for the first estimated candidate, give its estimate.
    first = estimated[0]
    run.session.activate_candidate(run.session.candidate_of(first))
    anchors = run.estimator.anchors
    probabilities = run.session.answer_probabilities(
        "search", anchors, against_rival=answers == "margin"
    ).scores["target"].values
    assert all(0.0 <= p <= 1.0 for p in probabilities) and not set(probabilities) <= {0.0, 1.0}
    assert first.scores["target"]["score"] == pytest.approx(np.mean(probabilities), abs=1e-9)
    if answers == "margin":
        # Above 1/2, every reference token beats its rival, so greedy decoding writes the reference (an
        # exact-match task); one generated answer per anchor checks it.
        greedy = run.session.evaluate("search", anchors).scores["target"].values
        assert any(p > 0.5 for p in probabilities)
        assert all(correct == 1.0 for p, correct in zip(probabilities, greedy, strict=True) if p > 0.5)
    champion = next(r for r in run.store.trials() if r.number == run.store.champion())
    assert champion.fully_evaluated and champion.scores["target"]["n"] == 300


def test_a_resumed_run_draws_the_same_anchors_after_audits_added_full_rows(tmp_path, zoo):
    """Anchors come from the parents' and untuned merges' answers alone: a resumed run, whose store now
    holds audited candidates' full rows too (which the IRT fit does use), still draws the same anchors."""
    data = demo_config(zoo, candidates=8, seed=2) | {
        "racing": {"enabled": False},
        "budget": {"candidates": 8, "population": 4},
        "fitness": {"estimator": "irt", "examples": 20, "audit_every": 4, "audit_top_k": 2},
    }
    config, root = parse_evolve_config(data, source="evolve.yaml", root=tmp_path)
    prepare_run_dir(config, tmp_path / "run")
    run = SearchRun(config, root, tmp_path / "run")
    run.run()
    assert run.store.audits
    resumed = SearchRun(config, root, tmp_path / "run")
    resumed.start()
    assert resumed.store.fully_evaluated()  # the audited candidates' full rows
    assert resumed.estimator.anchors == run.estimator.anchors


def test_likelihood_anchors_need_generative_tasks(tmp_path, zoo):
    choice = tmp_path / "choice"
    write_task_files(choice, [{"question": "1", "choices": ["a", "b"], "answer": 0}] * 4,
                     [{"question": "2", "choices": ["a", "b"], "answer": 1}], name="pick", scorer="choice",
                     scorer_args={"choices_field": "choices"})
    data = demo_config(zoo, candidates=2) | {
        "objectives": [{"task": str(choice / "pick.yaml")}],
        "fitness": {"estimator": "subset", "examples": 2, "anchor_answers": "likelihood"},
    }
    config, root = parse_evolve_config(data, source="evolve.yaml", root=tmp_path)
    prepare_run_dir(config, tmp_path / "run")
    with pytest.raises(ConfigError, match="objective 'pick' is not one"):
        SearchRun(config, root, tmp_path / "run").run()
