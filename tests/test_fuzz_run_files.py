"""Run directories, release packets and task data come back from disks, copies and hand edits: mutate the
real files of finished runs (fixture `lineage_runs`) and every reader must succeed or raise `EvomergeError`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.errors import EvomergeError
from evomerge.evaluate import load_task
from evomerge.lineage.dag import lineage
from evomerge.report.data import load_run_data
from evomerge.search import load_run
from evomerge.search.integrity import verify_parents_unchanged

FUZZ = settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8,
)


@st.composite
def byte_mutations(draw, original: bytes) -> bytes:
    """Truncated, overwritten or padded copies of a real file's bytes."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "append", "empty", "not_utf8"]))
    if kind == "truncate":
        return original[: draw(st.integers(0, max(0, len(original) - 1)))]
    if kind == "overwrite":
        at = draw(st.integers(0, max(0, len(original) - 1)))
        junk = draw(st.binary(min_size=1, max_size=16))
        return original[:at] + junk + original[at + len(junk):]
    if kind == "append":
        return original + draw(st.binary(max_size=64))
    if kind == "not_utf8":
        return b"\xff\xfe" + original
    return b""


def replace_random_node(data, path: list, value):
    """`data` with the node at `path` (indices into the nested containers) replaced by `value`."""
    if not path or not isinstance(data, dict | list) or not data:
        return value
    keys = list(data) if isinstance(data, dict) else list(range(len(data)))
    key = keys[path[0] % len(keys)]
    copy = dict(data) if isinstance(data, dict) else list(data)
    copy[key] = replace_random_node(copy[key], path[1:], value)
    return copy


def reads_cleanly(read) -> None:
    try:
        read()
    except EvomergeError:
        pass


def _copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


@FUZZ
@given(data=st.data())
def test_mutated_run_files_are_refused_cleanly(lineage_runs, tmp_path_factory, data):
    run = _copy(lineage_runs["run_a"], tmp_path_factory.mktemp("run") / "run")
    name = data.draw(st.sampled_from(["config.yaml", "study.db", "parents.json", "run.json"]))
    original = (run / name).read_bytes()
    if name.endswith(".json") and data.draw(st.booleans()):
        document = replace_random_node(json.loads(original), data.draw(st.lists(st.integers(0, 50), max_size=4)),
                                       data.draw(json_values))
        (run / name).write_text(json.dumps(document))
    elif name == "config.yaml" and data.draw(st.booleans()):
        document = replace_random_node(yaml.safe_load(original), data.draw(st.lists(st.integers(0, 50), max_size=3)),
                                       data.draw(json_values))
        (run / name).write_text(yaml.safe_dump(document))
    else:
        (run / name).write_bytes(data.draw(byte_mutations(original)))
    reads_cleanly(lambda: load_run(run))
    reads_cleanly(lambda: load_run_data(run))
    reads_cleanly(lambda: lineage(run))
    if name == "parents.json":
        config, _ = load_run(run)
        reads_cleanly(lambda: verify_parents_unchanged(run, [str(p) for p in config.parents], accept_changed=False))


@FUZZ
@given(data=st.data())
def test_mutated_lineage_files_are_refused_cleanly(lineage_runs, tmp_path_factory, data):
    packet = _copy(lineage_runs["packet_a"], tmp_path_factory.mktemp("packet") / "packet")
    original = json.loads((packet / "lineage.json").read_text())
    original["run"] = {"dir": "/nonexistent/run", "trial": 0}  # its own record is all the evidence
    if data.draw(st.booleans()):
        mutated = replace_random_node(original, data.draw(st.lists(st.integers(0, 50), max_size=4)), data.draw(json_values))
        (packet / "lineage.json").write_text(json.dumps(mutated))
    else:
        (packet / "lineage.json").write_bytes(data.draw(byte_mutations(json.dumps(original).encode())))
    reads_cleanly(lambda: lineage(packet))


@FUZZ
@given(data=st.data())
def test_mutated_task_data_is_refused_cleanly(lineage_runs, tmp_path_factory, data):
    task_dir = _copy(lineage_runs["task"].parent, tmp_path_factory.mktemp("task") / "task")
    name = data.draw(st.sampled_from(sorted(p.name for p in task_dir.iterdir())))
    (task_dir / name).write_bytes(data.draw(byte_mutations((task_dir / name).read_bytes())))
    reads_cleanly(lambda: load_task(task_dir / lineage_runs["task"].name))


def test_a_trial_attribute_that_is_no_json_is_refused_when_the_run_is_opened(lineage_runs, tmp_path):
    """Found by the fuzzer above: a damaged row used to escape from whichever reader touched it first."""
    import sqlite3

    import pytest

    run = _copy(lineage_runs["run_a"], tmp_path / "run")
    with sqlite3.connect(run / "study.db") as db:
        db.execute("UPDATE trial_user_attributes SET value_json = '{' WHERE trial_user_attribute_id = "
                   "(SELECT min(trial_user_attribute_id) FROM trial_user_attributes)")
    with pytest.raises(EvomergeError, match=r"its study '.*' cannot be opened \(missing or damaged database\)"):
        load_run(run)
    with pytest.raises(EvomergeError):
        load_run_data(run)
