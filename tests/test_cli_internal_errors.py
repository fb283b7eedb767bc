"""The error policy at the CLI boundary: a bug in any command is one line, exit 1 and a saved traceback."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from evomerge import cli

#: Each command and the library function it calls first, which we make fail with an unexpected error.
COMMANDS = {
    "merge": (["merge", "recipe.yaml", "--out", "out"], "evomerge.merge.recipe.load_recipe"),
    "zoo": (["zoo", "--out", "zoo-dir"], "evomerge.zoo.builder.build_zoo"),
    "eval": (["eval", "model", "--task", "t.yaml"], "evomerge.evaluate.load_task"),
    "evolve": (["evolve", "evolve.yaml", "--out", "run"], "evomerge.search.config.load_evolve_config"),
    "export": (["export", "run", "--out", "out"], "evomerge.lineage.packet.export_candidate"),
    "demo": (["demo", "--out", "out"], "evomerge.pipelines.demo.run_demo"),
    "lineage": (["lineage", "run"], "evomerge.lineage.dag.lineage"),
    "report": (["report", "run"], "evomerge.report.html.write_report"),
    "worker": (["worker", "sqlite:///x.db"], "evomerge.search.worker.run_worker"),
}


def test_every_command_is_covered():
    registered = {command.name or command.callback.__name__ for command in cli.app.registered_commands}
    assert registered == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unexpected_exception_is_one_line_exit_1_and_a_saved_traceback(command, monkeypatch, capsys, tmp_path):
    args, target = COMMANDS[command]
    module_name, attribute = target.rsplit(".", 1)
    module = __import__(module_name, fromlist=[attribute])

    def explode(*_args, **_kwargs):
        raise ZeroDivisionError("the bug under test")

    monkeypatch.setattr(module, attribute, explode)
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 1
    stderr = capsys.readouterr().err.strip()
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("internal error: ZeroDivisionError: the bug under test. This is a bug in evomerge")
    saved = Path(stderr.split("the traceback is saved in ")[1].rstrip("."))
    assert saved.parent == tmp_path and "ZeroDivisionError" in saved.read_text()
    assert "Traceback" not in stderr
