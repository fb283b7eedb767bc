"""Shared fixtures: tiny real Hugging Face checkpoints, built once per test session."""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.zoo.tokenizer import build_char_tokenizer

# No per-example time limit: property tests check behaviour, and a loaded 2-core CI machine (or a benchmark
# running beside the suite) made a 200 ms Hypothesis deadline fail a correct test.
settings.register_profile("evomerge", deadline=None)
settings.load_profile("evomerge")

TEST_CHARACTERS = string.digits + string.ascii_lowercase + " +-*=?.,:\n"


def make_llama(
    out_dir: Path,
    *,
    seed: int,
    hidden_size: int = 32,
    num_layers: int = 4,
    vocab_characters: str = TEST_CHARACTERS,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a randomly initialised `LlamaForCausalLM` with a char tokenizer to `out_dir`."""
    tokenizer = build_char_tokenizer(vocab_characters)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_gemma2_config():
    """A tiny Gemma 2 config: its sandwich norms make it the architecture layer paths must refuse."""
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )


@pytest.fixture(scope="session")
def evomerge_cli(tmp_path_factory: pytest.TempPathFactory):
    """`evomerge_cli.run(args, cwd) -> (returncode, stdout, stderr)`: the console script's entry point, each
    command line in its own process, forked from one that imported the CLI once (tests/cli_forkserver.py);
    offline, one torch thread, a 200-column terminal."""
    import os

    from cli_forkserver import CliServer

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "COLUMNS": "200"}
    server = CliServer(env, tmp_path_factory.mktemp("cli_streams"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory of tiny Llama checkpoints, cached per (seed, options) for the whole session."""
    cache: dict[tuple, Path] = {}

    def build(seed: int = 0, **options) -> Path:
        key = (seed, tuple(sorted(options.items())))
        if key not in cache:
            out_dir = tmp_path_factory.mktemp(f"llama_s{seed}")
            cache[key] = make_llama(out_dir, seed=seed, **options)
        return cache[key]

    return build


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (single file or sharded)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="session")
def tiny_family(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base (`tiny_llama(0)`) and two fine-tunes `ft1`, `ft2` = base + small seeded noise (realistic
    task vectors: every tensor moves a little, norms included), same config and tokenizer."""
    import shutil

    from safetensors.torch import save_file

    base = tiny_llama(0)
    family = {"base": base}
    weights = read_tensors(base)
    for index, scale in ((1, 0.05), (2, 0.08)):
        out = tmp_path_factory.mktemp(f"ft{index}")
        shutil.copytree(base, out, dirs_exist_ok=True)
        generator = torch.Generator().manual_seed(100 + index)
        tuned = {
            name: (
                value + scale * (value.std() + 0.1) * torch.randn(value.shape, generator=generator)
            ).contiguous()
            for name, value in weights.items()
        }
        save_file(tuned, str(out / "model.safetensors"), metadata={"format": "pt"})
        family[f"ft{index}"] = out
    return family


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `LlavaForConditionalGeneration` (2-layer CLIP tower + the `tiny_llama` text shape, same
    char tokenizer), saved once; its language tower is named `language_model.model.layers.N...`."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_char_tokenizer(TEST_CHARACTERS)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        image_size=8, patch_size=4, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=len(tokenizer) - 1)
    torch.manual_seed(7)
    out_dir = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def zoo():
    """The default tiny zoo (seed 0 unless EVOMERGE_TEST_ZOO_SEED says otherwise), cached across runs in `default_zoo_dir()` (``$EVOMERGE_CACHE`` or
    ``~/.cache/evomerge``): a build takes minutes on 2 cores; `build_zoo` rebuilds it whenever the zoo's
    source, preset, seed or torch/evomerge version changed, and locks against parallel builds.
    """
    from evomerge.zoo import build_zoo, default_zoo_dir

    # Another seed (EVOMERGE_TEST_ZOO_SEED) checks that no test leans on one build's weights.
    seed = int(os.environ.get("EVOMERGE_TEST_ZOO_SEED", "0"))
    return build_zoo(default_zoo_dir("tiny", seed), size="tiny", seed=seed)


def write_task_files(
    directory: Path, search: list[dict], test: list[dict], name: str = "t", **spec_overrides
) -> Path:
    """Write `search`/`test` rows as JSONL and a task YAML (exact scorer unless overridden) next to them."""
    import json

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("search", search), ("test", test)):
        (directory / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": name,
        "data": {"search": f"{name}_search.jsonl", "test": f"{name}_test.jsonl"},
        "prompt": "{question}=",
        "answer_field": "answer",
        "scorer": "exact",
        "generation": {"max_new_tokens": 8, "stop": ["\n"]},
        **spec_overrides,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def write_sum_task(directory: Path, examples: int) -> Path:
    """`sum.yaml`: a perplexity task on `a+b=` (continuous scores, so different merges rank differently);
    search and test draw the first operand from disjoint ranges (10-99, 100-999), so they never overlap."""
    import random

    rng = random.Random(0)
    splits = {
        split: [{"question": f"{a}+{b}=", "answer": str(a + b)}
                for a, b in ((rng.randint(low, high), rng.randint(10, 99)) for _ in range(examples))]
        for split, low, high in (("search", 10, 99), ("test", 100, 999))
    }
    return write_task_files(directory, splits["search"], splits["test"], name="sum", prompt="{question}",
                            scorer="perplexity")


def evolve_tiny_run(run_dir: Path, base: Path, parents: list[Path], task: Path) -> Path:
    """A 4-candidate dare_ties evolve (random sampler, population 2: two generations) of `parents` over `base`."""
    import yaml

    from evomerge.pipelines import evolve

    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": run_dir.name, "base_model": str(base), "parents": [str(p) for p in parents], "method": "dare_ties",
        "genome": {"weight": {"bounds": [0, 1.5], "granularity": "per_layer"}, "density": {"bounds": [0.1, 1.0]}},
        "objectives": [{"task": str(task)}], "budget": {"candidates": 4, "population": 2}, "optimizer": "random",
        "intended_use": f"test model {run_dir.name}", "batch_size": 16, "license": "apache-2.0",
    }))
    evolve(config_path, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def lineage_runs(tiny_llama, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run A (base + two fine-tunes), A's champion exported, and run B that uses it as a parent."""
    from evomerge.lineage.packet import export_candidate

    root = tmp_path_factory.mktemp("lineage_runs")
    rows = [{"question": f"{a}+{b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    task = write_task_files(root / "task", rows[:8], rows[8:], name="add", generation={"max_new_tokens": 2})
    base, one, two = tiny_llama(0), tiny_llama(1), tiny_llama(2)
    run_a = evolve_tiny_run(root / "run_a", base, [one, two], task)
    packet_a = export_candidate(run_a, "champion", root / "champion_a")
    run_b = evolve_tiny_run(root / "run_b", base, [packet_a, two], task)
    return {"root": root, "task": task, "base": base, "one": one, "two": two,
            "run_a": run_a, "packet_a": packet_a, "run_b": run_b}


def make_tiny_vlm(out_dir: Path, *, seed: int = 5) -> Path:
    """Save a randomly initialised tiny `LlavaForConditionalGeneration` with its `LlavaProcessor`.

    16x16 images in 8x8 patches: four image tokens per image (the CLS feature is dropped, Llava's
    default). The char tokenizer's `<unk>` is the image placeholder, so the vocabulary stays the
    text models'.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_char_tokenizer(TEST_CHARACTERS)
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.unk_token_id)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(out_dir, safe_serialization=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, do_convert_rgb=True
        ),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", image_token="<unk>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make_tiny_vlm`, saved once per session."""
    return make_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def vlm_zoo(zoo):
    """The seed's VLM zoo (docs/ZOO.md), built once per machine into the cache beside the text zoo (`zoo`):
    about four minutes on 2 cores, rebuilt whenever its source, the text zoo or the versions change."""
    from evomerge.zoo.vlm import build_vlm_zoo

    return build_vlm_zoo(seed=zoo.manifest["seed"], text_zoo_dir=zoo.root)
