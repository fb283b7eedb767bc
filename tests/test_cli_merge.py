"""`evomerge merge` as a user runs it: the installed console script exists and starts; every merge runs
its entry point in a process of its own (the `evomerge_cli` fixture), offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_tensors
from evomerge.merge import run_merge
from evomerge.merge.recipe import load_recipe, parse_recipe

EVOMERGE = Path(sys.executable).parent / "evomerge"  # the console script `pip install` created


@pytest.fixture
def evomerge(evomerge_cli, tmp_path):
    """`evomerge(*args) -> (returncode, stdout, stderr)`."""

    def run(*args: str | Path) -> tuple[int, str, str]:
        return evomerge_cli.run([str(arg) for arg in args], tmp_path)

    return run


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
    started = subprocess.run([str(EVOMERGE), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == 0 and "merge" in started.stdout


def test_merge_writes_a_loadable_model_with_card_and_recipes(tiny_family, tmp_path: Path, evomerge) -> None:
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, _, err = evomerge("merge", write_recipe(tmp_path, seeded_dare_ties(tiny_family)), "--out", out)
    assert code == 0, err
    assert "Traceback" not in err

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("7+5=", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # local parents are no Hub ids; the card names them by directory
    assert {"merge", "evomerge", "mergekit"} <= set(card.data.tags)
    # The library writes the same card: run_merge from Python is what the command calls.
    from_python = tmp_path / "from_python" / "merged"
    run_merge(parse_recipe(seeded_dare_ties(tiny_family)), from_python)
    assert (from_python / "README.md").read_text() == (out / "README.md").read_text()

    # recipe.yaml is the complete recipe: re-merging it reproduces every tensor, DARE masks included.
    saved = out / "recipe.yaml"
    assert load_recipe(saved) == parse_recipe(seeded_dare_ties(tiny_family))
    again = tmp_path / "again"
    assert evomerge("merge", saved, "--out", again)[0] == 0
    first, second = read_tensors(out), read_tensors(again)
    assert set(first) == set(second) and all(torch.equal(first[n], second[n]) for n in first)

    # mergekit's dialect of the same merge (mergekit has no seed; it draws its own masks).
    mergekit = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mergekit["merge_method"] == "dare_ties" and "seed" not in mergekit
    assert parse_recipe(mergekit).models == load_recipe(saved).models


# User errors (exit code 2, one sentence, nothing written) are the bad-input corpus's job: test_bad_inputs.py.


def test_allow_pickle_merges_a_pickled_checkpoint(tiny_family, tmp_path: Path, evomerge) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_family["ft1"], pickled)
    torch.save(read_tensors(pickled), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    out = tmp_path / "out"
    recipe = {
        "method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (tiny_family["ft2"], pickled)],
    }
    code, _, err = evomerge("merge", write_recipe(tmp_path, recipe), "--out", out, "--allow-pickle")
    assert code == 0, err
    a, c = read_tensors(tiny_family["ft1"]), read_tensors(tiny_family["ft2"])
    merged = read_tensors(out)
    assert set(merged) == set(a)
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + c[name]) / 2)
