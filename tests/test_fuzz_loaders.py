"""Loaders take files from strangers: whatever nested YAML-like data or mutated model file arrives, only
`EvomergeError` may escape."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from evomerge.errors import EvomergeError
from evomerge.evaluate import load_task
from evomerge.merge import StreamingMerge
from evomerge.merge.recipe import parse_recipe
from evomerge.models import Checkpoint, CheckpointWriter, refuse_remote_code
from evomerge.search.config import parse_evolve_config

# Keys the loaders know, mixed with arbitrary text, so the data reaches deep validation paths often.
KNOWN_KEYS = [
    "method", "merge_method", "models", "model", "parameters", "weight", "density", "base_model", "slices",
    "sources", "layer_range", "dtype", "seed", "name", "parents", "genome", "bounds", "granularity",
    "block_size", "objectives", "task", "budget", "candidates", "fixed", "dfs", "data", "search", "test",
    "prompt", "answer_field", "scorer", "scorer_args", "generation", "max_new_tokens", "fewshot", "path",
    "split_field", "filter", "value", "combine", "optimizer", "racing", "tokenizer", "source",
]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["linear", "ties", "dare_ties", "per_layer", "exact", "{question}="]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
    max_leaves=25,
)
top_level = st.one_of(documents, st.dictionaries(st.sampled_from(KNOWN_KEYS), documents, min_size=1, max_size=8))
FUZZ = settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(top_level)
def test_parse_recipe_raises_only_evomerge_errors(data):
    try:
        parse_recipe(data, source="fuzz.yaml")
    except EvomergeError:
        pass


@FUZZ
@given(top_level)
def test_parse_evolve_config_raises_only_evomerge_errors(data):
    try:
        parse_evolve_config(data, source="fuzz.yaml", root=Path("/nonexistent-root"))
    except EvomergeError:
        pass


@FUZZ
@given(top_level)
def test_load_task_raises_only_evomerge_errors(tmp_path_factory, data):
    directory = tmp_path_factory.mktemp("task")
    (directory / "rows.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    path = directory / "task.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        load_task(path)
    except EvomergeError:
        pass


# --- model-side loaders over mutations of real files --------------------------------------------------
# A copy of a real tiny checkpoint (the `tiny_llama` fixture; sharded and LoRA variants derived from it)
# gets one mutation: a truncation, garbage bytes, bytes that are not UTF-8, a huge length prefix, or a
# random JSON value (huge integers, NaN, wrong types, `../` paths) put anywhere in a JSON file or a
# safetensors header. Then the model is opened and used as `merge` uses it; only `EvomergeError` may escape.

# FUZZ_EXAMPLES raises the count for a long local hunt; the default keeps each test to a few seconds.
MODEL_FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "100")), suppress_health_check=list(HealthCheck)
)
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=10),
        st.sampled_from(["../outside/x.safetensors", "/etc/passwd", "model.safetensors", "LlamaForCausalLM",
                         "llama", "F32", "", "<unk>"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


def json_paths(node: object, path: tuple = ()) -> list[tuple]:
    """Every node of a JSON document as a key path, the root included."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    return [path, *(p for key, child in children for p in json_paths(child, (*path, key)))]


def mutate_json(document: object, data: st.DataObject) -> object:
    """`document` with one to three nodes (drawn uniformly, so the many vocabulary entries or header
    fields are hit most) replaced by random JSON values or dropped."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(json_paths(document)), label="path")
        if not path:
            return data.draw(json_values, label="document")
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and data.draw(st.integers(0, 3), label="drop") == 0:
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values, label="value")
    return document


def mutate_file(file: Path, data: st.DataObject) -> None:
    """One mutation of `file`: structural for JSON and safetensors, else (or also) at the byte level."""
    raw = file.read_bytes()
    kind = data.draw(st.sampled_from(["structure", "truncate", "garbage", "encoding"]), label="kind")
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="cut")]
    elif kind == "garbage":
        at = data.draw(st.integers(0, len(raw)), label="at")
        raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=16), label="bytes") + raw[at + 16 :]
    elif kind == "encoding":
        at = data.draw(st.integers(0, len(raw)), label="at")
        raw = raw[:at] + b"\xff\xfe\xc3" + raw[at:]
    elif file.suffix == ".safetensors":
        (length,) = struct.unpack("<Q", raw[:8])
        if data.draw(st.booleans(), label="length"):
            raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1), label="prefix")) + raw[8:]
        else:
            header = mutate_json(json.loads(raw[8 : 8 + length]), data)
            text = json.dumps(header).encode()
            raw = struct.pack("<Q", len(text)) + text + raw[8 + length :]
    else:
        raw = json.dumps(mutate_json(json.loads(raw), data)).encode()
    file.write_bytes(raw)


def use_model(model: Path, reference: Path, **options) -> None:
    """Open `model` and do what `merge` does with a parent: metadata, tokenizer, compatibility, merge."""
    checkpoint = Checkpoint.open(model, **options)
    refuse_remote_code(checkpoint)
    checkpoint.num_layers, checkpoint.model_type, checkpoint.architecture  # noqa: B018 (properties read)
    checkpoint.file_fingerprint()
    checkpoint.vocabulary()
    checkpoint.content_hash()
    recipe = parse_recipe(
        {"method": "linear", "models": [{"model": str(model), "parameters": {"weight": 0.5}},
                                        {"model": str(reference), "parameters": {"weight": 0.5}}]},
        source="fuzz.yaml",
    )
    for _job, _tensor in StreamingMerge(recipe):
        pass


def fuzz_copy(source: Path, factory, data: st.DataObject, names: list[str]) -> Path:
    """A fresh copy of the model directory `source` with one of `names` mutated."""
    model = factory.mktemp("fuzzed") / "model"
    shutil.copytree(source, model)
    mutate_file(model / data.draw(st.sampled_from(names), label="file"), data)
    return model


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama, tmp_path_factory) -> Path:
    """`tiny_llama(0)` in several shards with an index (written by our own writer)."""
    source = Checkpoint.open(tiny_llama(0))
    out = tmp_path_factory.mktemp("sharded") / "model"
    with CheckpointWriter(out, max_shard_bytes=40_000) as writer:
        for name, tensor in source.iter_tensors():
            writer.add(name, tensor)
        writer.copy_files(source.path)
    return out


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A PEFT-layout LoRA adapter on `tiny_llama(0)`: two linear modules, a bias and an embedding."""
    base = Checkpoint.open(tiny_llama(0))
    out = tmp_path_factory.mktemp("adapter")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        rows, cols = base.shape(f"{module}.weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(2, cols, generator=generator)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, 2, generator=generator)
    rows, cols = base.shape("model.embed_tokens.weight")
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(2, rows, generator=generator)
    tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(cols, 2, generator=generator)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(base.path),
              "alpha_pattern": {"up_proj": 2}, "fan_in_fan_out": False, "use_rslora": False}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


@MODEL_FUZZ
@given(data=st.data())
def test_mutated_checkpoint_is_used_or_refused(tiny_llama, tmp_path_factory, data):
    source = tiny_llama(0)
    names = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json"]
    model = fuzz_copy(source, tmp_path_factory, data, [n for n in names if (source / n).is_file()])
    try:
        use_model(model, source)
    except EvomergeError:
        pass


@MODEL_FUZZ
@given(data=st.data())
def test_mutated_sharded_checkpoint_is_used_or_refused(sharded_llama, tiny_llama, tmp_path_factory, data):
    names = sorted(p.name for p in sharded_llama.glob("*.safetensors")) + ["model.safetensors.index.json"]
    model = fuzz_copy(sharded_llama, tmp_path_factory, data, names)
    try:
        use_model(model, tiny_llama(0))
    except EvomergeError:
        pass


@MODEL_FUZZ
@given(data=st.data())
def test_mutated_lora_adapter_is_used_or_refused(llama_adapter, tiny_llama, tmp_path_factory, data):
    adapter = fuzz_copy(llama_adapter, tmp_path_factory, data, ["adapter_config.json", "adapter_model.safetensors"])
    try:
        use_model(adapter, tiny_llama(0), base=tiny_llama(0))
    except EvomergeError:
        pass
