"""A run directory belongs to one coordinator, is never silently replaced, and is never created by a reader."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import evolve_tiny_run, write_sum_task
from evomerge.errors import ConfigError
from evomerge.pipelines import evolve
from evomerge.search import load_run
from evomerge.search.coordination import exclusive_run
from evomerge.search.store import STUDY_FILE


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    task = write_sum_task(root, examples=12)
    return evolve_tiny_run(root / "run", tiny_llama(0), [tiny_llama(1), tiny_llama(2)], task)


def test_a_second_coordinator_is_refused_naming_the_first(finished):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from evomerge.search.coordination import exclusive_run
            with exclusive_run(Path({str(finished)!r})):
                print("holding", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(ConfigError, match=rf"is in use by evomerge process {holder.pid}; wait for it"):
            evolve(finished.parent / f"{finished.name}.yaml", finished)
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no stale lock: the run can be resumed at once.
    with exclusive_run(finished):
        pass


def test_a_run_whose_study_vanished_is_refused_not_restarted(finished, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.yaml").write_text((finished / "config.yaml").read_text())
    with pytest.raises(ConfigError, match=f"has config.yaml but no {STUDY_FILE}, so its history is lost"):
        evolve(finished.parent / f"{finished.name}.yaml", copy)
    assert not (copy / STUDY_FILE).exists()
    # Readers refuse too, and create nothing.
    with pytest.raises(ConfigError, match="so its history is lost"):
        load_run(copy)
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml"]


def test_damaged_run_files_are_config_errors(finished, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot be read as YAML; the run directory is damaged"):
        load_run(broken)
    (broken / "config.yaml").write_text(yaml.safe_dump({"name": 3, "objectives": "no"}))
    with pytest.raises(ConfigError, match="is not a valid evolve config; the run directory is damaged"):
        load_run(broken)
    (broken / "config.yaml").write_text((finished / "config.yaml").read_text())
    (broken / STUDY_FILE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match="cannot be opened"):
        load_run(broken)


def test_run_naming_a_file_is_refused(finished, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a directory for the run"):
        evolve(finished.parent / f"{finished.name}.yaml", target)
    assert target.read_text() == "x"


def test_a_fresh_run_refused_mid_start_leaves_nothing(finished, tmp_path):
    """Every candidate fails (an infinite fixed scale): a user error, and no half-made run directory."""
    config = yaml.safe_load((finished.parent / f"{finished.name}.yaml").read_text())
    config["genome"] = {"weight": {"bounds": [1e300, 2e300]}}
    config["fixed"] = {"density": 1.0}
    (tmp_path / "overflow.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="no candidate was fully evaluated .*check the genome's bounds"):
        evolve(tmp_path / "overflow.yaml", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_report_out_naming_a_directory_is_refused_and_leaves_nothing(finished, tmp_path):
    from evomerge.errors import ExportError
    from evomerge.report import write_report

    with pytest.raises(ExportError, match="is a directory; give the report's file name"):
        write_report(finished, tmp_path)
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp"))


def test_a_failed_candidate_is_not_exported(finished, tmp_path):
    """Every candidate of this run overflows: none may become a release packet."""
    from evomerge.lineage import export_candidate
    from evomerge.search.store import FAILED

    config = yaml.safe_load((finished.parent / f"{finished.name}.yaml").read_text())
    config["genome"] = {"weight": {"bounds": [1e300, 2e300]}}
    config["fixed"] = {"density": 1.0}
    config["name"] = "overflow"
    (tmp_path / "overflow.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    from evomerge.search.config import load_evolve_config
    from evomerge.search.run import SearchRun
    from evomerge.search.store import prepare_run_dir

    loaded, root = load_evolve_config(tmp_path / "overflow.yaml")
    prepare_run_dir(loaded, run)
    SearchRun(loaded, root, run).run()  # the loop itself keeps going past failed candidates
    _, store = load_run(run)
    failed = next(r for r in store.trials() if r.status == FAILED)
    with pytest.raises(ConfigError, match=rf"candidate {failed.number} of .* failed \(.*\); a failed candidate is not exported"):
        export_candidate(run, str(failed.number), tmp_path / "packet")
    assert not (tmp_path / "packet").exists()


def test_an_unreachable_study_database_is_a_config_error_and_leaves_nothing(finished, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = yaml.safe_load((finished.parent / f"{finished.name}.yaml").read_text())
    config["storage"] = f"postgresql+psycopg2://nobody@127.0.0.1:{port}/nothing"
    (tmp_path / "pg.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"cannot open the study database postgresql\+psycopg2://nobody@127.0.0.1:{port}/nothing"):
        evolve(tmp_path / "pg.yaml", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_frozen_before_a_config_field_existed_resumes(tmp_path):
    """A frozen config without a field added later (here `fitness`, `parents_pool`) means that field's
    default, so resuming it is not a different config; a changed value still is."""
    from evomerge.search.config import EvolveConfig
    from evomerge.search.store import CONFIG_FILE, prepare_run_dir

    config = EvolveConfig.model_validate({"parents": ["a", "b"], "genome": {"weight": {}}, "objectives": [{"task": "t"}]})
    older = config.model_dump(mode="json")
    del older["fitness"], older["parents_pool"]
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(older))
    (tmp_path / STUDY_FILE).write_text("")
    prepare_run_dir(config, tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        prepare_run_dir(config.model_copy(update={"seed": 5}), tmp_path)
