"""`evomerge eval`: a good run prints the table and writes JSON (bad task files: the corpus, test_bad_inputs.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import write_task_files
from evomerge.cli import run

SEARCH = [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(5)]
TEST = [{"question": f"{i}-1", "answer": str(i - 1)} for i in range(3)]


def invoke(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process (fast) and return (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evomerge", *args])
    capsys.readouterr()  # drop earlier output (e.g. progress bars of a fixture building a model)
    with pytest.raises(SystemExit) as info:
        run()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda_exits_2(tmp_path, tiny_llama, monkeypatch, capsys):
    task = write_task_files(tmp_path, SEARCH, TEST)
    code, _, err = invoke(
        monkeypatch, capsys, "eval", str(tiny_llama(seed=0)), "--task", str(task), "--device", "cuda"
    )
    assert code == 2 and "CUDA is not available" in " ".join(err.split())


def test_eval_prints_table_and_writes_json_in_a_process_of_its_own(tmp_path, tiny_llama, evomerge_cli):
    task = write_task_files(tmp_path, SEARCH, TEST, generation={"max_new_tokens": 3})
    out_json = tmp_path / "scores.json"
    args = ["eval", str(tiny_llama(seed=0)), "--task", str(task), "--split", "test", "--limit", "2",
            "--out", str(out_json)]
    code, stdout, stderr = evomerge_cli.run(args, tmp_path)
    assert code == 0, stderr
    assert "score ± stderr" in stdout and "│ t " in stdout
    data = json.loads(out_json.read_text())
    assert data["split"] == "test"
    assert data["tasks"]["t"]["n"] == 2 and data["tasks"]["t"]["indices"] == [0, 1]
    assert data["tasks"]["t"]["score"] == sum(data["tasks"]["t"]["values"]) / 2
    # --json prints the same result on stdout instead of the table
    code, stdout, stderr = evomerge_cli.run([*args[:-2], "--json"], tmp_path)
    assert code == 0, stderr
    assert json.loads(stdout)["tasks"]["t"]["values"] == data["tasks"]["t"]["values"]
