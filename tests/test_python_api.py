"""The Python API: `evomerge.evolve` takes an `EvolveConfig` object and a Python objective function
(Optuna's pattern) whose returned keys are the config's `python:KEY` objectives; the package is typed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import evomerge
from evomerge.errors import ConfigError
from evomerge.lineage.packet import export_candidate
from evomerge.search.config import EvolveConfig

KEYS = ("closeness", "norm")


def config(family: dict[str, Path], **extra) -> EvolveConfig:
    return EvolveConfig(
        name="python-objective", base_model=str(family["base"]), parents=[str(family["ft1"]), str(family["ft2"])],
        method="task_arithmetic", genome={"weight": {"bounds": [0.0, 1.0]}},
        objectives=[{"task": "python:closeness"}, {"task": "python:norm", "weight": 0.0}],
        budget={"candidates": 4, "population": 2}, optimizer="random", license="apache-2.0", **extra,
    )


@torch.no_grad()
def scores_of(model, target: torch.Tensor) -> dict[str, float]:
    """Closeness of the output head to `target` (higher is better) and the head's norm."""
    head = model.get_output_embeddings().weight.float()
    return {"closeness": -float((head - target).pow(2).mean()), "norm": float(head.norm())}


def test_evolve_takes_a_config_object_and_a_python_objective(tiny_family, tmp_path):
    target = AutoModelForCausalLM.from_pretrained(tiny_family["ft1"]).get_output_embeddings().weight.detach().float()
    splits = []

    def objective(model, tokenizer, split):
        splits.append(split)
        return scores_of(model, target)

    outcome = evomerge.evolve(config(tiny_family), tmp_path / "run", objective=objective)
    assert set(splits) == {"search", "test"}
    champion = outcome.test_results[f"candidate:{outcome.selection.champion}"]
    # Independently: the exported champion, read back from disk, scored by the same function.
    packet = export_candidate(tmp_path / "run", "champion", tmp_path / "champion")
    expected = scores_of(AutoModelForCausalLM.from_pretrained(packet), target)
    for key in KEYS:
        assert champion["search"][key]["score"] == pytest.approx(expected[key], rel=1e-4)
        assert champion["test"][key]["score"] == pytest.approx(expected[key], rel=1e-4)


def test_a_result_without_a_declared_key_stops_the_run(tiny_family, tmp_path):
    with pytest.raises(ConfigError, match=r"returned \['closeness'\], without \['norm'\]"):
        evomerge.evolve(config(tiny_family), tmp_path / "run", objective=lambda model, tokenizer: {"closeness": 0.0})
    assert not (tmp_path / "run").exists()


def test_python_objectives_need_the_function(tiny_family, tmp_path):
    with pytest.raises(ConfigError, match="objective python:closeness needs a Python objective function"):
        evomerge.evolve(config(tiny_family), tmp_path / "run")


def test_the_package_is_typed():
    assert (Path(evomerge.__file__).parent / "py.typed").is_file()
