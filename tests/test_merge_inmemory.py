"""The in-memory merger of the search gives exactly the streaming merge's weights, deterministically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import read_tensors
from evomerge.errors import ConfigError
from evomerge.merge.inmemory import InMemoryMerger, NonFiniteWeightsError
from evomerge.merge.plan import apply_job, job_parameters, plan_jobs
from evomerge.merge.recipe import Recipe, parse_recipe
from evomerge.merge.stream import run_merge


def dare_ties(family: dict[str, Path], *, seed: int, density: float = 0.5) -> Recipe:
    return parse_recipe(
        {
            "method": "dare_ties",
            "base_model": str(family["base"]),
            "seed": seed,
            "models": [
                {"model": str(family["ft1"]), "parameters": {"weight": [0.2, 0.9], "density": density}},
                {"model": str(family["ft2"]), "parameters": {"weight": 0.6, "density": [0.3, 0.8]}},
            ],
            "parameters": {"lambda": 1.3},
        }
    )


def linear(family: dict[str, Path], w1: float) -> Recipe:
    return parse_recipe(
        {
            "method": "linear",
            "models": [
                {"model": str(family["ft1"]), "parameters": {"weight": [w1, 1 - w1]}},
                {
                    "model": str(family["ft2"]),
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1}]},
                },
            ],
        }
    )


def live_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["linear", "dare_ties"])
def test_merge_into_is_bit_identical_to_the_streaming_merge(tiny_family, tmp_path: Path, kind: str) -> None:
    recipe = linear(tiny_family, 0.8) if kind == "linear" else dare_ties(tiny_family, seed=5)
    run_merge(recipe, tmp_path / "streamed")
    streamed = read_tensors(tmp_path / "streamed")

    merger = InMemoryMerger(recipe)
    module = AutoModelForCausalLM.from_pretrained(tiny_family["base"])
    merger.merge_into(module, recipe)
    live = live_weights(module)
    assert set(live) == set(streamed)
    for name, tensor in streamed.items():
        assert torch.equal(live[name], tensor), name
    state = merger.state_dict(recipe)
    assert all(torch.equal(state[name], tensor) for name, tensor in streamed.items())


def test_each_candidate_fully_replaces_the_previous_one(tiny_family) -> None:
    first, second = dare_ties(tiny_family, seed=1), dare_ties(tiny_family, seed=2, density=0.9)
    merger = InMemoryMerger(first)
    reused = AutoModelForCausalLM.from_pretrained(tiny_family["base"])
    merger.merge_into(reused, first)
    merger.merge_into(reused, second)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_family["ft1"])
    merger.merge_into(fresh, second)
    reused_weights, fresh_weights = live_weights(reused), live_weights(fresh)
    assert all(torch.equal(reused_weights[name], fresh_weights[name]) for name in fresh_weights)


def test_dare_masks_depend_on_seed_and_tensor_name_only(tiny_family) -> None:
    recipe = dare_ties(tiny_family, seed=3)
    merger = InMemoryMerger(recipe)
    in_order = dict(merger.tensors(recipe))
    # Recompute every tensor alone, in reverse order, from freshly read parents: the same masks come out.
    jobs = plan_jobs(recipe, merger.spec, merger.checkpoints)
    for job in reversed(jobs):
        stacked = torch.stack([merger.checkpoints[src.ref].get(src.tensor) for src in job.inputs])
        base = merger.checkpoints[job.base.ref].get(job.base.tensor)
        alone = apply_job(
            merger.spec, base, stacked, job_parameters(merger.spec, job), seed=3, out_name=job.out_name
        )
        assert torch.equal(alone, in_order[job.out_name]), job.out_name
    other_seed = dict(merger.tensors(recipe.model_copy(update={"seed": 4})))
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(other_seed[q], in_order[q])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_raise_naming_the_tensor(tiny_family, tmp_path: Path, bad: float) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["ft1"], broken)
    tensors = read_tensors(broken)
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = bad
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    recipe = parse_recipe(
        {
            "method": "task_arithmetic",
            "base_model": str(tiny_family["base"]),
            "models": [{"model": str(broken), "parameters": {"weight": 0.5}}],
        }
    )
    merger = InMemoryMerger(recipe)
    with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        merger.merge_into(AutoModelForCausalLM.from_pretrained(tiny_family["base"]), recipe)


def test_task_vectors_are_resident_once(tiny_family) -> None:
    recipe = dare_ties(tiny_family, seed=0)
    merger = InMemoryMerger(recipe)
    numel = sum(t.numel() for t in read_tensors(tiny_family["base"]).values())
    # Per tensor: two task vectors and the base, float32.
    assert merger.resident_bytes() == 3 * numel * 4


def test_candidates_must_belong_to_the_merger_family(tiny_family) -> None:
    merger = InMemoryMerger(dare_ties(tiny_family, seed=0))
    with pytest.raises(ConfigError, match=r"method, base model and \(some of its\) parents"):
        dict(merger.tensors(linear(tiny_family, 0.5)))
    stacked = parse_recipe(
        {
            "method": "passthrough",
            "slices": [{"sources": [{"model": str(tiny_family["ft1"]), "layer_range": [0, 2]}]}],
        }
    )
    with pytest.raises(ConfigError, match="slices"):
        InMemoryMerger(stacked)


def test_a_subset_of_the_parents_merges_like_a_merger_of_that_subset(tiny_family) -> None:
    """A pool search's candidate uses some of the template's parents: the same weights as a merger holding
    only those, and a reordered or foreign subset is refused."""
    full = dare_ties(tiny_family, seed=0)
    alone = full.model_copy(update={"models": full.models[1:]})
    expected = dict(InMemoryMerger(alone).tensors(alone))
    for name, tensor in InMemoryMerger(full).tensors(alone):
        torch.testing.assert_close(tensor, expected[name])
    reordered = full.model_copy(update={"models": list(reversed(full.models))})
    with pytest.raises(ConfigError, match="some of its"):
        dict(InMemoryMerger(full).tensors(reordered))
