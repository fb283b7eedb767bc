"""Writing a model when the disk fills up, or when the process is killed mid-write.

`evomerge merge` and `evomerge export` both write through `models.CheckpointWriter`; `merge` is used here
because it needs no finished run. The "disk" is a per-process file-size limit (RLIMIT_FSIZE) below the
model's size: writes past it fail with EFBIG exactly as a full disk fails with ENOSPC (SIGXFSZ is ignored
in the child so the error reaches the writer instead of killing the process).
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from evomerge.models import Checkpoint

EVOMERGE = Path(sys.executable).parent / "evomerge"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def write_recipe(directory: Path, first: Path, second: Path) -> Path:
    recipe = {"method": "linear", "models": [{"model": str(first), "parameters": {"weight": 0.5}},
                                             {"model": str(second), "parameters": {"weight": 0.5}}]}
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def limited_to(max_file_bytes: int):
    """A `preexec_fn`: files may not grow past `max_file_bytes`, and crossing it is an error, not a signal."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return apply


def tree_digest(directory: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (a packet's exact content)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def merge(recipe: Path, out: Path, *extra: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EVOMERGE), "merge", str(recipe), "--out", str(out), *extra], capture_output=True,
                          text=True, env=ENV, timeout=300, check=False,
                          preexec_fn=None if limit is None else limited_to(limit))


def test_disk_full_exits_2_leaves_nothing_and_keeps_the_old_packet(tiny_llama, tmp_path) -> None:
    first, second = tiny_llama(0), tiny_llama(1)
    model_bytes = (first / "model.safetensors").stat().st_size
    limit = model_bytes // 3  # room for the config and tokenizer files, not for the weights
    assert max(p.stat().st_size for p in first.iterdir() if p.name != "model.safetensors") < limit
    recipe = write_recipe(tmp_path, first, second)
    out = tmp_path / "packet"
    before = sorted(p.name for p in tmp_path.iterdir())

    failed = merge(recipe, out, limit=limit)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "Traceback" not in failed.stdout + failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and f"Could not write the model to {out}: File too large" in lines[0], failed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no packet, no hidden temporary directory

    # An existing packet survives a failed --overwrite byte for byte.
    assert merge(recipe, out).returncode == 0
    packet = tree_digest(out)
    assert "model.safetensors" in packet
    listing = sorted(p.name for p in tmp_path.iterdir())
    failed = merge(recipe, out, "--overwrite", limit=limit)
    assert failed.returncode == 2 and "File too large" in failed.stderr, failed.stderr[-2000:]
    assert tree_digest(out) == packet
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_sigkill_mid_write_leaves_no_complete_looking_target(tiny_llama, tmp_path) -> None:
    recipe = write_recipe(tmp_path, tiny_llama(0), tiny_llama(1))
    out = tmp_path / "packet"
    process = subprocess.Popen([str(EVOMERGE), "merge", str(recipe), "--out", str(out)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    # Kill as soon as the writer has created its temporary directory: the write is under way.
    while not list(tmp_path.glob(".packet.tmp-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode == -signal.SIGKILL and not out.exists():
        return  # killed before the rename: nothing at the target (the expected outcome)
    # The kill came after the atomic rename: then the target must be the whole, valid model.
    assert sorted(Checkpoint.open(out).tensor_names()) == sorted(Checkpoint.open(tiny_llama(0)).tensor_names())
