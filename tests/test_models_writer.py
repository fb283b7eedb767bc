"""CheckpointWriter: sharded round trips through transformers, atomic replacement, cleanup, disk-full."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.errors import ExportError
from evomerge.models import Checkpoint, CheckpointWriter


def write_copy(source: Checkpoint, out_dir, **options) -> None:
    with CheckpointWriter(out_dir, **options) as writer:
        for name, tensor in source.iter_tensors():
            writer.add(name, tensor)
        writer.copy_files(source.path)


def test_sharded_round_trip_loads_in_transformers(tiny_llama, tmp_path):
    source = Checkpoint.open(tiny_llama(0))
    sizes = [source.get(n).numel() * 4 for n in source.tensor_names()]
    limit = 20_000
    out = tmp_path / "out"
    write_copy(source, out, max_shard_bytes=limit, metadata={"recipe": "copy"})

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    total = len(shards)
    assert total > 1
    assert shards == [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
    assert index["metadata"]["total_size"] == sum(sizes)
    for shard in shards:  # no shard exceeds the limit unless it holds a single larger tensor
        names = [n for n, s in index["weight_map"].items() if s == shard]
        assert sum(source.get(n).numel() * 4 for n in names) <= max(limit, max(sizes))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*shards, "model.safetensors.index.json", "config.json", "generation_config.json"]
        + ["tokenizer.json", "tokenizer_config.json"]
    )
    assert not list(tmp_path.glob(".out.tmp-*"))

    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_llama(0)).state_dict()
    assert reloaded.keys() == original.keys()
    for name in original:
        torch.testing.assert_close(reloaded[name], original[name], rtol=0, atol=0)
    assert Checkpoint.open(out).content_hash() == source.content_hash()


def test_single_shard_is_model_safetensors_with_metadata(tiny_llama, tmp_path):
    from safetensors import safe_open

    source = Checkpoint.open(tiny_llama(0, dtype=torch.bfloat16))
    write_copy(source, tmp_path / "one", metadata={"recipe": "copy"})
    names = {p.name for p in (tmp_path / "one").iterdir()}
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    with safe_open(str(tmp_path / "one" / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "recipe": "copy"}
    assert Checkpoint.open(tmp_path / "one").content_hash() == source.content_hash()


def test_existing_output_is_refused_or_replaced_only_when_complete(tiny_llama, tmp_path):
    source = Checkpoint.open(tiny_llama(0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old model")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        CheckpointWriter(out).__enter__()
    # A failing overwrite leaves the old directory untouched.
    with pytest.raises(RuntimeError, match="merge failed"), CheckpointWriter(out, overwrite=True) as writer:
        writer.add("x", torch.ones(2))
        raise RuntimeError("merge failed")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    write_copy(source, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert Checkpoint.open(out).content_hash() == source.content_hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no tmp or old directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    write_copy(source, empty)  # an empty directory is not a model: fine to fill
    assert (empty / "model.safetensors").is_file()


@pytest.mark.parametrize("interrupt", [ValueError("bad"), KeyboardInterrupt()])
def test_any_exception_removes_the_temporary_directory(tmp_path, interrupt):
    with pytest.raises(type(interrupt)), CheckpointWriter(tmp_path / "out", max_shard_bytes=8) as writer:
        writer.add("a", torch.ones(4))
        writer.add("b", torch.ones(4))  # hands the first shard to the shard thread
        writer._in_flight.result()  # synchronise with that thread instead of racing it
        assert len(list(tmp_path.glob(".out.tmp-*/*.partial"))) == 1
        raise interrupt
    assert list(tmp_path.iterdir()) == []


def test_user_errors_are_export_errors(tiny_llama, tmp_path):
    with CheckpointWriter(tmp_path / "out") as writer:
        writer.add("a", torch.ones(1))
        with pytest.raises(ExportError, match="'a' was added twice"):
            writer.add("a", torch.ones(1))
        with pytest.raises(ExportError, match="dtype torch.complex64"):
            writer.add("c", torch.ones(1, dtype=torch.complex64))
        with pytest.raises(ExportError, match="Donor file .*missing.json does not exist"):
            writer.copy_files(tiny_llama(0), ["missing.json"])
        for escape in ("../evil.txt", "/etc/evil", "a/../../evil.txt", "."):
            with pytest.raises(ExportError, match="escapes the output directory"):
                writer.write_text(escape, "x")
        assert writer.write_text("docs/README.md", "hello") == tmp_path / "out" / "docs" / "README.md"
    assert (tmp_path / "out" / "docs" / "README.md").read_text() == "hello"
    assert not (tmp_path / "evil.txt").exists()
    with pytest.raises(ExportError, match="No tensors were added"), CheckpointWriter(tmp_path / "none"):
        pass
    assert not (tmp_path / "none").exists()


def test_disk_full_raises_export_error_and_leaves_nothing(tmp_path):
    """A real write failure: the child process may not grow any file beyond 64 KiB (RLIMIT_FSIZE)."""
    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from evomerge.errors import ExportError
        from evomerge.models import CheckpointWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        try:
            with CheckpointWriter({str(tmp_path / "out")!r}, max_shard_bytes=40_000) as writer:
                writer.add("small", torch.ones(1000))
                writer.add("large", torch.ones(100_000))
        except ExportError as error:
            print("ExportError:", error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"ExportError: Could not write the model to {tmp_path / 'out'}: File too large."
    )
    assert list(tmp_path.iterdir()) == []
