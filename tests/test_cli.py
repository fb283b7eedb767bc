"""One CLI: fast config validation, the import weight of validation, shared flags, enums in --help,
--version, the Ctrl-C hint and the progress display (rich on a terminal, plain lines in a log)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import evomerge
from evomerge import cli
from evomerge.display import Progress, SearchProgress, format_seconds
from evomerge.search.run import CandidateResult

SRC = str(Path(evomerge.__file__).parent.parent)
HEAVY = ("torch", "transformers", "optuna", "sqlalchemy")


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The worktree's evomerge in a fresh interpreter (nothing preloaded: what a user's shell pays)."""
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def evomerge_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return python("-m", "evomerge.cli", *args, cwd=cwd)


def test_a_bad_evolve_config_exits_2_with_one_sentence_before_heavy_imports(tmp_path):
    config = {"parents": ["a", "b"], "genome": {"weight": {"bounds": [0, 1]}}, "objectives": [{"task": "t.yaml"}],
              "budgt": {"candidates": 3}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    # The same process then reports which heavy modules the rejection imported.
    probe = ("import sys, runpy\nsys.argv = ['evomerge', 'evolve', 'bad.yaml', '--out', 'run']\n"
             "try:\n    runpy.run_module('evomerge.cli', run_name='__main__')\nfinally:\n"
             f"    print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = python("-c", probe, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["error: bad.yaml: unknown key 'budgt'; did you mean 'budget'?"]
    assert done.stdout.strip() == "[]"
    assert not (tmp_path / "run").exists()


def test_validating_a_whole_config_imports_no_torch_transformers_or_optuna(tmp_path):
    (tmp_path / "t.yaml").write_text("name: t\n")  # only its existence is checked here
    config = {"parents": ["a", "b"], "base_model": "base", "method": "dare_ties",
              "genome": {"weight": {"bounds": [0, 1], "per_model": True}, "density": {"bounds": [0.1, 1]}},
              "objectives": [{"task": "t.yaml"}], "baselines": {"half": {"method": "linear", "models": [
                  {"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}]}}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config))
    code = ("import sys\nimport evomerge.cli\nfrom evomerge.search.config import load_evolve_config\n"
            "config, _ = load_evolve_config('ok.yaml')\n"
            f"print(config.method, sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    done = python("-c", code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "dare_ties []"


def test_version_and_completion(tmp_path):
    done = evomerge_process("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"evomerge {evomerge.__version__}"
    assert "--install-completion" in evomerge_process("--help", cwd=tmp_path).stdout


@pytest.mark.parametrize(("command", "choices"), [
    ("zoo", "tiny|small|medium"), ("eval", "search|test"), ("merge", "float32|float16|bfloat16"),
    ("lineage", "text|json|dot"), ("demo", "init|best_baseline"),
])
def test_help_lists_the_choices(command, choices, tmp_path):
    assert choices in evomerge_process(command, "--help", cwd=tmp_path).stdout


def test_a_wrong_choice_is_refused_with_the_choices(tmp_path):
    done = evomerge_process("zoo", "--out", "z", "--size", "huge", cwd=tmp_path)
    assert done.returncode == 2 and not (tmp_path / "z").exists()
    assert done.stderr.strip() == "error: option --size: 'huge' is not one of 'tiny', 'small', 'medium'."
    done = evomerge_process("evolve", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: Missing argument 'config'."



def test_shared_flags_mean_the_same_everywhere():
    import typer.main

    group = typer.main.get_command(cli.app)
    options = {name: {opt for param in command.params for opt in param.opts} for name, command in group.commands.items()}
    for name in ("zoo", "eval", "export", "merge", "demo", "evolve", "report"):
        assert "--out" in options[name], name
    for name, opts in options.items():
        assert "--json" in opts, name
    assert "--candidate" in options["export"] and "--budget" in options["demo"] and "--candidates" not in options["demo"]
    for name in ("eval", "merge"):
        assert {"--device", "--allow-pickle"} <= options[name], name


@pytest.mark.parametrize(("args", "target", "resumable"), [
    (["worker", "sqlite:///x.db"], "evomerge.search.worker.run_worker", True),
    (["export", "run", "--out", "out"], "evomerge.lineage.packet.export_candidate", False),
])
def test_ctrl_c_names_the_command_to_rerun(args, target, resumable, monkeypatch, capsys):
    module_name, attribute = target.rsplit(".", 1)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(__import__(module_name, fromlist=[attribute]), attribute, interrupted)
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    with pytest.raises(SystemExit) as exited:
        cli.run()
    assert exited.value.code == 130
    stderr = " ".join(capsys.readouterr().err.split())
    assert f"run `evomerge {' '.join(args)}` again to" in stderr
    assert ("resume where it stopped" in stderr) == resumable


def test_plain_progress_prints_dated_lines_only_past_the_quiet_period():
    times = iter([0.0, 0.5, 3.0, 4.0, 5.0, 40.0, 41.0])
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with Progress(console, "loading", total=4, plain_every=30, clock=lambda: next(times)) as bar:  # started at 0
        bar.update(description="evaluating a", advance=1)  # 0.5: quiet period, nothing
        bar.update(description="evaluating b", advance=1)  # 3.0: a new description is printed
        bar.update(advance=1)  # 4.0: same description, within plain_every: nothing
        bar.update(description="evaluating b")  # 5.0: unchanged description: nothing
        bar.update(advance=1)  # 40.0: plain_every passed
    lines = log.getvalue().splitlines()  # exit at 41.0 prints where it ended
    assert [line.split("] ", 1)[1] for line in lines] == [
        "evaluating b 2/4 (3s)", "evaluating b 4/4 (40s)", "evaluating b 4/4 (41s)"]


def test_quick_work_prints_nothing_in_a_log():
    log = io.StringIO()
    with Progress(Console(file=log, force_terminal=False), "exporting", total=1) as bar:
        bar.update(advance=1)
    assert log.getvalue() == ""


def result(finished: int, fitness: float, status: str = "complete") -> CandidateResult:
    return CandidateResult(finished - 1, 0, status, fitness, (fitness,), {}, 10, 5, 0.1, 0.2,
                           finished=finished, budget=10, best_parent=0.4)


def test_the_search_display_shows_total_rate_eta_and_best_against_the_best_parent():
    now = [0.0]
    display = SearchProgress(Console(file=io.StringIO(), force_terminal=False), budget=10, clock=lambda: now[0])
    assert display.progress.total == 10  # known from the config before the first candidate
    now[0] = 100.0
    display.candidate(result(3, 0.3))  # a resumed run: 2 finished before; no rate from one point
    assert display.progress.total == 10 and display.progress.completed == 3
    assert "/min" not in display.progress.info and "best 0.3000  (best parent 0.4000)" in display.progress.info
    now[0] = 130.0
    display.candidate(result(5, 0.5))  # two more in 30 s: 4/min, 5 left: 75 s
    assert display.progress.info.split("  ")[:5] == [
        "gen 0", "best 0.5000", "(best parent 0.4000)", "4.0/min", "ETA 1m15s"]
    display.candidate(result(6, 0.9, status="raced_out"))  # a raced-out score is not a best
    assert "best 0.5000" in display.progress.info


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600 + 7 * 60)] == ["0s", "59s", "1m01s", "1h07m"]


def test_eval_json_and_out_agree(tmp_path, tiny_llama, evomerge_cli):
    from conftest import write_task_files

    rows = [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)]
    task = write_task_files(tmp_path, rows[:2], rows[2:], generation={"max_new_tokens": 2})
    code, stdout, stderr = evomerge_cli.run(["eval", str(tiny_llama(seed=0)), "--task", str(task), "--json",
                                             "--out", str(tmp_path / "s.json")], tmp_path)
    assert code == 0, stderr
    assert json.loads(stdout) == json.loads((tmp_path / "s.json").read_text())
