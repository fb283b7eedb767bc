"""Checkpoint.open on real tiny checkpoints: lazy reads, hashes, fingerprints, hub cache, corruption, pickles."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import TEST_CHARACTERS
from evomerge.errors import ModelError
from evomerge.models import Checkpoint


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def expected_hash(state: dict[str, torch.Tensor], dtype_codes: dict[torch.dtype, str]) -> str:
    """The documented content-hash recipe, computed independently from an in-memory state dict."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].contiguous()
        digest.update(f"{name}\0{dtype_codes[tensor.dtype]}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_open_reads_metadata_and_tensors_lazily_matching_transformers(tiny_llama):
    path = tiny_llama(0)
    checkpoint = Checkpoint.open(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    state = model.state_dict()
    assert checkpoint.tensor_names() == sorted(state)
    assert checkpoint.model_type == "llama" and checkpoint.architecture == "LlamaForCausalLM"
    assert checkpoint.num_layers == 4
    assert not checkpoint.requires_remote_code
    name = "model.layers.2.mlp.up_proj.weight"
    assert checkpoint.shape(name) == tuple(state[name].shape)
    assert checkpoint.dtype(name) == torch.float32
    torch.testing.assert_close(checkpoint.get(name), state[name], rtol=0, atol=0)
    assert checkpoint.get(name, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="no tensor named 'nope'"):
        checkpoint.get("nope")


def test_content_hash_is_layout_independent_and_matches_the_documented_recipe(tiny_llama, tmp_path):
    path = tiny_llama(0)
    state = load_file(path / "model.safetensors")
    codes = {torch.float32: "F32"}
    checkpoint = Checkpoint.open(path)
    assert checkpoint.content_hash() == expected_hash(state, codes)
    # Same weights as a pickle: same identity.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled)
    torch.save(state, pickled / "pytorch_model.bin")
    assert Checkpoint.open(pickled, allow_pickle=True).content_hash() == checkpoint.content_hash()
    # One changed element: a different identity.
    state["model.norm.weight"][0] += 1.0
    changed = copy_model(path, tmp_path / "changed")
    save_file(state, changed / "model.safetensors", metadata={"format": "pt"})
    assert Checkpoint.open(changed).content_hash() != checkpoint.content_hash()


def test_file_fingerprint_changes_when_files_change(tiny_llama, tmp_path):
    path = copy_model(tiny_llama(0), tmp_path / "m")
    before = Checkpoint.open(path).file_fingerprint()
    assert Checkpoint.open(path).file_fingerprint() == before
    stat = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert Checkpoint.open(path).file_fingerprint() != before


def test_tokenizer_fingerprint_tracks_vocabulary_and_is_none_without_tokenizer(tiny_llama, tmp_path):
    same_a, same_b = Checkpoint.open(tiny_llama(0)), Checkpoint.open(tiny_llama(1))
    other = Checkpoint.open(tiny_llama(0, vocab_characters="abc0123"))
    assert same_a.tokenizer_fingerprint() == same_b.tokenizer_fingerprint()
    assert same_a.tokenizer_fingerprint() != other.tokenizer_fingerprint()
    # The char tokenizer's ids: four special tokens, then the sorted characters.
    assert same_a.vocabulary()["<s>"] == 1
    assert same_a.vocabulary()["a"] == 4 + sorted(set(TEST_CHARACTERS)).index("a")
    assert other.vocabulary()["a"] == 4 + sorted("abc0123").index("a")
    # Changing only a special-token role changes the fingerprint too.
    changed = copy_model(tiny_llama(0), tmp_path / "special")
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["eos_token"] = "<pad>"
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    assert Checkpoint.open(changed).tokenizer_fingerprint() != same_a.tokenizer_fingerprint()
    bare = copy_model(tiny_llama(0), tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    assert Checkpoint.open(bare).tokenizer_fingerprint() is None


def test_remote_code_is_recorded_not_executed(tiny_llama, tmp_path):
    path = copy_model(tiny_llama(0), tmp_path / "remote")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(config))
    (path / "modeling_evil.py").write_text("raise SystemExit('executed remote code')\n")
    checkpoint = Checkpoint.open(path)
    assert checkpoint.requires_remote_code
    assert checkpoint.content_hash() == Checkpoint.open(tiny_llama(0)).content_hash()


def test_num_layers_falls_back_to_tensor_names(tiny_llama, tmp_path):
    path = copy_model(tiny_llama(0, num_layers=3), tmp_path / "nolayers")
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    assert Checkpoint.open(path).num_layers == 3


def test_hub_id_resolves_from_a_local_hf_cache_without_network(tiny_llama, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / revision
    shutil.copytree(tiny_llama(0), snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_CACHE once at import; point the already-imported module at it too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    checkpoint = Checkpoint.open("tiny-org/tiny-llama")
    assert checkpoint.path == snapshot
    assert checkpoint.content_hash() == Checkpoint.open(tiny_llama(0)).content_hash()
    assert Checkpoint.open("tiny-org/tiny-llama", revision=revision).path == snapshot
    with pytest.raises(
        ModelError, match="'tiny-org/absent' is neither a local directory nor in the Hugging Face cache"
    ):
        Checkpoint.open("tiny-org/absent")


@pytest.mark.parametrize(
    ("remove", "message"),
    [("config.json", "has no config.json"), ("model.safetensors", "has no weights")],
)
def test_missing_files_are_named(tiny_llama, tmp_path, remove, message):
    path = copy_model(tiny_llama(0), tmp_path / "m")
    (path / remove).unlink()
    with pytest.raises(ModelError, match=message):
        Checkpoint.open(path)
    with pytest.raises(ModelError, match="does not exist"):
        Checkpoint.open(tmp_path / "nowhere")


def _rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length :])


def _lie_about_shape(header: dict) -> None:
    header["model.norm.weight"]["shape"] = [64]


def _point_past_the_end(header: dict) -> None:
    entry = max((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"][1])
    entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-100]), "is truncated"),
        (lambda f: f.write_bytes(f.read_bytes()[:5]), "is not a safetensors file"),
        (lambda f: f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:]), "header claims"),
        (lambda f: f.write_bytes(f.read_bytes()[:8] + b"{not json" + f.read_bytes()[17:]), "not valid JSON"),
        (lambda f: _rewrite_header(f, _lie_about_shape), "'model.norm.weight' spans 128 bytes but its shape"),
        (lambda f: _rewrite_header(f, _point_past_the_end), "starts at byte"),
    ],
    ids=["truncated", "tiny", "huge-header", "bad-json", "shape-lie", "offset-lie"],
)
def test_corrupt_safetensors_fail_at_open_naming_the_file(tiny_llama, tmp_path, corrupt, message):
    path = copy_model(tiny_llama(0), tmp_path / "m")
    corrupt(path / "model.safetensors")
    with pytest.raises(ModelError, match=message) as info:
        Checkpoint.open(path)
    assert str(path / "model.safetensors") in str(info.value)


def _shard(tiny: Path, target: Path) -> Path:
    """Split a tiny checkpoint into two shards with an index, as `save_pretrained` would."""
    path = copy_model(tiny, target)
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, shard_names in halves.items():
        save_file({n: state[n] for n in shard_names}, path / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, shard_names in halves.items() for n in shard_names}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_sharded_checkpoint_is_read_and_its_index_validated(tiny_llama, tmp_path):
    path = _shard(tiny_llama(0), tmp_path / "sharded")
    assert Checkpoint.open(path).content_hash() == Checkpoint.open(tiny_llama(0)).content_hash()
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())

    unlisted = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != "lm_head.weight"})
    index_file.write_text(json.dumps(unlisted))
    with pytest.raises(ModelError, match="does not list tensor 'lm_head.weight'"):
        Checkpoint.open(path)

    phantom = dict(
        index, weight_map={**index["weight_map"], "ghost.weight": "model-00001-of-00002.safetensors"}
    )
    index_file.write_text(json.dumps(phantom))
    with pytest.raises(ModelError, match="lists tensor 'ghost.weight'"):
        Checkpoint.open(path)

    index_file.write_text(json.dumps(index))
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelError, match="refers to shard 'model-00002-of-00002.safetensors', which does not exist"
    ):
        Checkpoint.open(path)


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_llama, tmp_path):
    path = tmp_path / "pickle"
    path.mkdir()
    shutil.copy(tiny_llama(0) / "config.json", path)
    state = load_file(tiny_llama(0) / "model.safetensors")
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model.bin is a pickle checkpoint; pass --allow-pickle"):
        Checkpoint.open(path)
    checkpoint = Checkpoint.open(path, allow_pickle=True)
    torch.testing.assert_close(checkpoint.get("lm_head.weight"), state["lm_head.weight"], rtol=0, atol=0)
    # weights_only=True: a pickle that would run code is refused even when pickles are allowed.
    torch.save({"weight": torch.zeros(1), "payload": os.system}, path / "pytorch_model.bin")
    with pytest.raises(ModelError, match="Cannot load pickle checkpoint"):
        Checkpoint.open(path, allow_pickle=True)


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from /proc")
def test_release_unmaps_a_read_tensor_and_its_views_still_read_the_file(tmp_path):
    big = torch.arange(16 * 2**20, dtype=torch.float32).reshape(4096, 4096)  # 64 MiB
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    save_file({"a.weight": torch.ones(3), "big.weight": big}, str(tmp_path / "model.safetensors"))
    del big
    checkpoint = Checkpoint.open(tmp_path)
    view = checkpoint.get("big.weight")
    before = _resident_bytes()
    expected_sum = float(view.sum(dtype=torch.float64))  # touches every page of the mapping
    mapped = _resident_bytes()
    checkpoint.release("big.weight")
    released = _resident_bytes()
    assert mapped - before > 48 * 2**20
    assert mapped - released > 48 * 2**20
    assert float(view.sum(dtype=torch.float64)) == expected_sum  # the view maps the file's pages again
    assert torch.equal(checkpoint.get("a.weight"), torch.ones(3))
