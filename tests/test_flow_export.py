"""Exporting a path as a plain checkpoint with folded scales, checked against the live PathModel.

Tolerances (float32): with the norms' epsilon made negligible (1e-30) the folding is exact algebra, so logits agree to
float32 round-off (asserted at 1e-5). With the checkpoints' own epsilon (1e-6) a hidden state scaled by c
sees an effective epsilon of eps/c²; on these random tiny models, whose embeddings have mean square ~4e-4
(small, so the effect is large), scales in [0.5, 2] moved logits of magnitude ~0.4 by ~6e-4: asserted at 3e-3.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from conftest import tiny_gemma2_config, write_task_files
from evomerge.errors import ConfigError, ExportError
from evomerge.evaluate import Evaluator, load_task
from evomerge.flow import PathModel, PathSpec, export_path, fold_factors

REPEATED_STEPS = ((0, 0), (1, 1), (0, 1), (0, 1), (1, 3), (0, 2), (1, 3), (0, 3))


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


def negligible_norm_eps(*models: torch.nn.Module) -> None:
    """Make every RMSNorm scale-invariant in practice, isolating the folding algebra from epsilon effects.

    1e-30 rather than 0: the all-zero padding embedding would give 0/0 = NaN, which attention would
    spread through its (zero-weighted) values; 1e-30 is still ~26 orders below any mean square here.
    """
    for model in models:
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 1e-30


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded prompts."""
    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@torch.no_grad()
def max_logit_gap(first: torch.nn.Module, second: torch.nn.Module) -> float:
    ids, mask = token_batch()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a = first(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    b = second(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    keep = mask.bool()  # padded positions carry no meaning
    return (a - b)[keep].abs().max().item()


@pytest.fixture(scope="module")
def source_dirs(tiny_llama: Callable[..., Path]) -> list[Path]:
    return [tiny_llama(21), tiny_llama(22)]


def test_fold_factors_follow_the_recursion() -> None:
    assert fold_factors([2.0, 0.5, 4.0]) == [0.5, 1.0, 0.25]
    with pytest.raises(ExportError, match="step 1 has scale 0.0"):
        fold_factors([1.0, 0.0])
    with pytest.raises(ExportError, match="step 0 has scale -2.0"):
        fold_factors([-2.0])


def test_unit_scales_export_a_plain_deeper_model(source_dirs: list[Path], tmp_path: Path) -> None:
    spec = PathSpec((4, 4), REPEATED_STEPS, (1.0,) * len(REPEATED_STEPS))
    out = export_path(spec, source_dirs, tmp_path / "frankenmerge")
    exported = load(out)
    assert isinstance(exported, LlamaForCausalLM)
    assert exported.config.num_hidden_layers == len(REPEATED_STEPS)
    # The exported layer 4 is source B's layer 3, untouched.
    source_b = load(source_dirs[1])
    torch.testing.assert_close(
        exported.model.layers[4].mlp.down_proj.weight, source_b.model.layers[3].mlp.down_proj.weight
    )
    path = PathModel([load(source_dirs[0]), source_b], spec).eval()
    assert max_logit_gap(path, exported) < 1e-5
    record = json.loads((out / "evomerge_path.json").read_text())
    assert PathSpec.from_dict(record["path"]) == spec and record["fold_factors"] == [1.0] * len(
        REPEATED_STEPS
    )
    assert (out / "tokenizer.json").read_text() == (source_dirs[0] / "tokenizer.json").read_text()


def test_exported_greedy_generation_matches_the_path(source_dirs: list[Path], tmp_path: Path) -> None:
    # HF's own generate() on the exported model vs the path model decoded by hand without a cache.
    spec = PathSpec((4, 4), REPEATED_STEPS, (1.0,) * len(REPEATED_STEPS))
    exported = load(export_path(spec, source_dirs, tmp_path / "out"))
    path = PathModel([load(d) for d in source_dirs], spec).eval()
    ids, mask = token_batch()
    with torch.no_grad():
        generated = exported.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )[:, ids.shape[1] :]
        for _ in range(6):
            logits = path(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids[:, -6:])


def test_evaluation_engine_decodes_a_path_like_its_export(source_dirs: list[Path], tmp_path: Path) -> None:
    # The engine's batched, left-padded, KV-cached greedy decoding, fed the path model and the plain
    # exported model (unit scales: the two compute the same function), must produce the same tokens.
    spec = PathSpec((4, 4), REPEATED_STEPS, (1.0,) * len(REPEATED_STEPS))
    exported = load(export_path(spec, source_dirs, tmp_path / "out"))
    path = PathModel([load(d) for d in source_dirs], spec).eval()
    rows = [{"question": "12+3" * (1 + i % 3) + str(i), "answer": "0"} for i in range(7)]
    held_out = [{"question": "9", "answer": "9"}]
    task = load_task(write_task_files(tmp_path / "task", rows, held_out, generation={"max_new_tokens": 8}))
    evaluator = Evaluator(AutoTokenizer.from_pretrained(source_dirs[0]), [task], batch_size=4)
    from_path = evaluator.generate(path, "t", range(7))
    from_export = evaluator.generate(exported, "t", range(7))
    assert [from_path[i].ids for i in range(7)] == [from_export[i].ids for i in range(7)]
    assert sum(len(from_path[i].ids) for i in range(7)) > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_random_scales_fold_exactly_up_to_norm_epsilon(
    source_dirs: list[Path], tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    spec = PathSpec((4, 4), REPEATED_STEPS, tuple(rng.uniform(0.5, 2.0) for _ in REPEATED_STEPS))
    path = PathModel([load(d) for d in source_dirs], spec).eval()
    exported = load(export_path(path, source_dirs, tmp_path / "out"))
    assert max_logit_gap(path, exported) < 3e-3  # with the checkpoints' epsilon (see module docstring)
    negligible_norm_eps(path, exported)
    assert max_logit_gap(path, exported) < 1e-5
    # Sanity: ignoring the scales would be far off (the test can tell folding from no folding).
    unscaled = PathModel([load(d) for d in source_dirs], PathSpec((4, 4), REPEATED_STEPS, (1.0,) * 8)).eval()
    negligible_norm_eps(unscaled)
    assert max_logit_gap(unscaled, exported) > 1e-2


def test_tied_embeddings_and_biases_fold(tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    # A Llama with tied embeddings and biases on every projection: o_proj/down_proj biases must scale too.
    config = AutoConfig.from_pretrained(tiny_llama(23))
    config = LlamaConfig(
        **{**config.to_dict(), "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}
    )
    torch.manual_seed(23)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.05)
    source = tmp_path / "biased"
    model.save_pretrained(source)
    (source / "tokenizer.json").write_text((tiny_llama(23) / "tokenizer.json").read_text())
    spec = PathSpec((4,), ((0, 0), (0, 2), (0, 2), (0, 3)), (1.7, 0.6, 1.4, 0.8))
    path = PathModel([load(source)], spec).eval()
    out = export_path(path, [source], tmp_path / "out")
    exported = load(out)
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    negligible_norm_eps(path, exported)
    assert max_logit_gap(path, exported) < 1e-5


def test_non_positive_scale_is_refused_before_writing(source_dirs: list[Path], tmp_path: Path) -> None:
    spec = PathSpec((4, 4), ((0, 0), (1, 0)), (1.0, -0.5))
    with pytest.raises(ExportError, match="step 1 has scale -0.5"):
        export_path(spec, source_dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_different_hidden_sizes_are_refused(tiny_llama: Callable[..., Path], tmp_path: Path) -> None:
    spec = PathSpec((4, 4), ((0, 0), (1, 0)), (1.0, 1.0))
    with pytest.raises(ConfigError, match="different hidden size"):
        export_path(spec, [tiny_llama(21), tiny_llama(24, hidden_size=48)], tmp_path / "out")


def test_sandwich_norm_architecture_is_refused(tmp_path: Path) -> None:
    # Gemma 2 adds post-norms inside each block, which do not commute with a scale: no weights are needed
    # to refuse, only the config.
    gemma = tmp_path / "gemma2"
    tiny_gemma2_config().save_pretrained(gemma)
    with pytest.raises(ConfigError, match="model_type 'gemma2'"):
        export_path(PathSpec((2,), ((0, 1), (0, 0)), (1.0, 2.0)), [gemma], tmp_path / "out")


def test_non_empty_output_directory_is_refused(source_dirs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export_path(PathSpec((4, 4), ((0, 0),), (1.0,)), source_dirs, out)
    assert (out / "keep.txt").read_text() == "user data"
