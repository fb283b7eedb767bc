"""The `Session` contract (search/session.py), run unchanged against every kind of session.

Like Optuna's one storage test suite over every backend: a parameter-space `SearchSession` and a
layer-path `DfsSession`, each over tiny real checkpoints, must keep the same promises.
"""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from conftest import write_sum_task
from evomerge.search.config import parse_evolve_config
from evomerge.search.session import Session, open_session
from evomerge.search.store import ATTRIBUTES, TrialRecord


def scores(session: Session, split: str = "search") -> dict[str, float]:
    return {name: s.score for name, s in session.evaluate(split).scores.items()}


@pytest.fixture(scope="module", params=["parameter space", "layer paths"])
def session(request, tiny_family, tiny_llama, tmp_path_factory) -> Session:
    root = tmp_path_factory.mktemp("session")
    write_sum_task(root, examples=8)
    common = {"name": "contract", "objectives": [{"task": "sum.yaml"}], "budget": {"candidates": 4}, "seed": 5}
    if request.param == "parameter space":
        data = {**common, "base_model": str(tiny_family["base"]),
                "parents": [str(tiny_family["ft1"]), str(tiny_family["ft2"])], "method": "dare_ties",
                "genome": {"weight": {"bounds": [0, 1], "granularity": "per_layer"}, "density": {"bounds": [0.1, 1]}}}
    else:
        data = {**common, "dfs": {"sources": [str(tiny_llama(31)), str(tiny_llama(32))], "repeats": 2,
                                  "max_path_length": 8}}
    config, root = parse_evolve_config(data, source="contract", root=root)
    return open_session(config, root)


def other_genes(session: Session) -> dict[str, float]:
    """A genome away from the initial one (every gene at 3/4 of its range), still a valid candidate."""
    genes = {g.name: g.low + 0.75 * (g.high - g.low) for g in session.genome.genes}
    if "on.000.s0l0" in genes:  # a path: keep model A's first layers on, the rest off
        genes = {name: (1.0 if name.startswith("on.00") and int(name[3:6]) < 3 else -1.0) if name.startswith("on.")
                 else value for name, value in genes.items()}
    return genes


def test_is_a_session(session):
    assert isinstance(session, Session)


def test_decode_is_deterministic_and_describe_keys_agree(session):
    genes = session.genome.initial()
    first, again = session.decode(genes), session.decode(dict(genes))
    assert first == again
    key, attributes = session.describe(genes, first)
    assert session.describe(dict(genes), again)[0] == key
    other = other_genes(session)
    assert session.describe(other, session.decode(other))[0] != key
    assert set(attributes) <= set(ATTRIBUTES) and session.candidate_text(first) in attributes.values()


def test_a_recorded_candidate_reads_back_and_reproduces_its_scores(session):
    genes = other_genes(session)
    candidate = session.decode(genes)
    seconds = session.activate_candidate(candidate)
    assert seconds >= 0
    expected = scores(session)
    assert scores(session) == expected  # evaluating again without activating changes nothing
    _, attributes = session.describe(genes, candidate)
    record = TrialRecord(number=0, state=TrialState.COMPLETE, params=genes, values=None, **attributes)
    read_back = session.candidate_of(record)
    assert session.candidate_text(read_back) == session.candidate_text(candidate)
    session.activate_parent(session.parents()[0])
    session.activate_candidate(read_back)
    assert scores(session) == expected


def test_parents_and_baselines_activate_and_score(session):
    parents = session.parents()
    assert parents and len(set(parents)) == len(parents)
    for ref in parents:
        session.activate_parent(ref)
        assert all(math.isfinite(v) for v in scores(session).values())
    baselines = session.baselines()
    assert list(baselines) == list(session.baselines())  # a stable order
    for candidate in baselines.values():
        session.activate_baseline(candidate)
        first = scores(session)
        session.activate_parent(parents[-1])
        session.activate_baseline(candidate)
        assert scores(session) == first and all(math.isfinite(v) for v in first.values())
    for genes in session.parent_genomes().values():
        assert set(genes) == set(session.genome.names)


def test_evidence_names_the_parents_and_the_tasks(session):
    evidence = session.evidence()
    assert [p["ref"] for p in evidence["parents"]] == session.parents()
    assert all(len(p["content_hash"]) == 64 for p in evidence["parents"])
    assert [t["name"] for t in evidence["suite"]] == [t.name for t in session.objectives.tasks]
    assert evidence["compatibility"]["verdict"]
