"""`evomerge merge` as a user runs it: the installed console script, in a subprocess, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from conftest import TEST_CHARACTERS, read_tensors
from evomerge.merge.recipe import load_recipe, parse_recipe

EVOMERGE = Path(sys.executable).parent / "evomerge"  # the console script `pip install` created
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def evomerge(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EVOMERGE), *map(str, args)],
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=300,
        check=False,
    )


def write_recipe(directory: Path, recipe: dict | str, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


def seeded_dare_ties(family: dict[str, Path]) -> dict:
    return {
        "method": "dare_ties",
        "base_model": str(family["base"]),
        "seed": 17,
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.7, "density": [0.4, 0.9]}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "name": "tiny-dare",
    }


def test_console_script_is_installed() -> None:
    assert EVOMERGE.is_file() and os.access(EVOMERGE, os.X_OK)
    assert "merge" in evomerge("--help").stdout


def test_merge_writes_a_loadable_model_with_card_and_recipes(tiny_family, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = evomerge("merge", write_recipe(tmp_path, seeded_dare_ties(tiny_family)), "--out", out)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("7+5=", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [str(tiny_family[k]) for k in ("base", "ft1", "ft2")]
    assert {"merge", "evomerge"} <= set(card.data.tags)

    # recipe.yaml is the complete recipe: re-merging it reproduces every tensor, DARE masks included.
    saved = out / "recipe.yaml"
    assert load_recipe(saved) == parse_recipe(seeded_dare_ties(tiny_family))
    again = tmp_path / "again"
    assert evomerge("merge", saved, "--out", again).returncode == 0
    first, second = read_tensors(out), read_tensors(again)
    assert set(first) == set(second) and all(torch.equal(first[n], second[n]) for n in first)

    # mergekit's dialect of the same merge (mergekit has no seed; it draws its own masks).
    mergekit = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mergekit["merge_method"] == "dare_ties" and "seed" not in mergekit
    assert parse_recipe(mergekit).models == load_recipe(saved).models


# --- user errors: exit code 2, one sentence naming the culprit, no traceback, no output left ------


def assert_user_error(result: subprocess.CompletedProcess[str], out: Path, *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return lines[0]


def linear_of(*models: Path | str, **recipe) -> dict:
    return {
        "method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **recipe,
    }


def test_missing_model_directory(tiny_family, tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    out = tmp_path / "out"
    result = evomerge("merge", write_recipe(tmp_path, linear_of(tiny_family["ft1"], missing)), "--out", out)
    assert_user_error(result, out, str(missing))


def test_mismatched_shapes(tiny_llama, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = linear_of(tiny_llama(0), tiny_llama(1, hidden_size=48))
    message = assert_user_error(evomerge("merge", write_recipe(tmp_path, recipe), "--out", out), out)
    assert "shape" in message and "model." in message  # names a tensor and both shapes


def test_different_tokenizers(tiny_llama, tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = TEST_CHARACTERS.replace("?", "!")  # same vocabulary size, different tokens behind the ids
    recipe = linear_of(tiny_llama(0), tiny_llama(0, vocab_characters=other))
    message = assert_user_error(evomerge("merge", write_recipe(tmp_path, recipe), "--out", out), out)
    assert "tokenizer" in message.lower()


def test_unknown_method_suggests(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {**linear_of(tiny_family["ft1"]), "method": "slurp"}
    assert_user_error(evomerge("merge", write_recipe(tmp_path, recipe), "--out", out), out, "slurp", "slerp")


def test_parameter_out_of_range(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {
        "method": "ties",
        "base_model": str(tiny_family["base"]),
        "models": [{"model": str(tiny_family["ft1"]), "parameters": {"weight": 1, "density": 1.5}}],
    }
    assert_user_error(evomerge("merge", write_recipe(tmp_path, recipe), "--out", out), out, "density", "1.5")


def test_pickle_checkpoint_needs_allow_pickle(tiny_family, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_family["ft1"], pickled)
    torch.save(read_tensors(pickled), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, linear_of(tiny_family["ft2"], pickled))
    assert_user_error(evomerge("merge", recipe, "--out", out), out, str(pickled), "pickle")
    # With the flag the same merge succeeds and averages the two.
    assert evomerge("merge", recipe, "--out", out, "--allow-pickle").returncode == 0
    a, c = read_tensors(tiny_family["ft1"]), read_tensors(tiny_family["ft2"])
    merged = read_tensors(out)
    torch.testing.assert_close(merged["lm_head.weight"], (a["lm_head.weight"] + c["lm_head.weight"]) / 2)


def test_corrupt_safetensors(tiny_family, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_family["ft1"], corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated download
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, linear_of(tiny_family["ft2"], corrupt))
    assert_user_error(evomerge("merge", recipe, "--out", out), out, "model.safetensors")


def test_unknown_recipe_key_suggests_the_nearest(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {**linear_of(tiny_family["ft1"]), "tokenizer_sorce": str(tiny_family["ft1"])}
    path = write_recipe(tmp_path, recipe)
    assert_user_error(
        evomerge("merge", path, "--out", out), out, str(path), "tokenizer_sorce", "tokenizer_source"
    )


def test_malformed_yaml(tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = write_recipe(tmp_path, "method: linear\nmodels: [{model: /a\n  parameters: {weight: 1}\n")
    assert_user_error(evomerge("merge", path, "--out", out), out, str(path), "YAML", "line")


def test_required_parameter_missing(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = {
        "method": "linear",
        "models": [{"model": str(tiny_family["ft1"])}, {"model": str(tiny_family["ft2"])}],
    }
    assert_user_error(
        evomerge("merge", write_recipe(tmp_path, recipe), "--out", out), out, "'weight'", "required"
    )


def test_bad_dtype_option_suggests(tiny_family, tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, linear_of(tiny_family["ft1"]))
    assert_user_error(
        evomerge("merge", recipe, "--out", out, "--dtype", "bfloat61"), out, "--dtype", "bfloat16"
    )
