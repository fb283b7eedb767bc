"""LoRA task vectors against real `peft`: our delta must equal `merge_and_unload()` weights minus base."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from evomerge.errors import ModelError
from evomerge.models import Checkpoint, load_lora_task_vectors


def save_adapter(base_dir, out_dir, config: LoraConfig, *, seed: int = 0):
    """Train-free adapter: PEFT's non-zero random init of A and B; returns the merged state dict."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    for name, module in model.named_modules():  # make `modules_to_save` copies differ from the base
        if name.endswith("modules_to_save.default"):
            module.weight.data += 0.25
    model.save_pretrained(out_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_deltas_match(deltas, base: Checkpoint, merged: dict[str, torch.Tensor]) -> None:
    changed = {n for n in base.tensor_names() if not torch.equal(merged[n], base.get(n))}
    assert set(deltas) == changed
    for name in changed:
        torch.testing.assert_close(deltas[name], merged[name] - base.get(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_deltas_equal_peft_merge_and_unload(tiny_llama, tmp_path, use_rslora):
    base_dir = tiny_llama(0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        alpha_pattern={"down_proj": 2},
        modules_to_save=["lm_head"],
        use_rslora=use_rslora,
        init_lora_weights=False,
    )
    merged = save_adapter(base_dir, tmp_path / "adapter", config)
    base = Checkpoint.open(base_dir)
    deltas = load_lora_task_vectors(tmp_path / "adapter", base)
    assert "model.layers.0.self_attn.q_proj.weight" in deltas and "lm_head.weight" in deltas
    assert "model.embed_tokens.weight" in deltas and "model.layers.0.self_attn.k_proj.weight" not in deltas
    assert_deltas_match(deltas, base, merged)


def test_adapter_directory_opens_as_a_base_plus_delta_checkpoint(tiny_llama, tmp_path):
    base_dir = tiny_llama(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "up_proj"], init_lora_weights=False)
    merged = save_adapter(base_dir, tmp_path / "adapter", config, seed=1)
    base = Checkpoint.open(base_dir)
    for view in (
        Checkpoint.open(tmp_path / "adapter", base=base),
        Checkpoint.open(tmp_path / "adapter"),  # base from adapter_config's base_model_name_or_path
    ):
        assert view.adapter == tmp_path / "adapter" and view.path == tmp_path / "adapter"
        assert view.tensor_names() == base.tensor_names() and view.config == base.config
        assert view.config_dir == base.path and view.num_layers == 4
        assert view.tokenizer_fingerprint() == base.tokenizer_fingerprint()
        for name in view.tensor_names():
            torch.testing.assert_close(view.get(name), merged[name], rtol=1e-5, atol=1e-6)
        assert view.content_hash() != base.content_hash()
    with pytest.raises(ModelError, match="is not a PEFT adapter directory"):
        Checkpoint.open(base_dir, base=base)


def test_fan_in_fan_out_conv1d_lora_on_gpt2(tmp_path):
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=40, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    lora = LoraConfig(
        r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    merged = save_adapter(tmp_path / "gpt2", tmp_path / "adapter", lora)
    base = Checkpoint.open(tmp_path / "gpt2")
    deltas = load_lora_task_vectors(tmp_path / "adapter", base)
    assert sorted(deltas) == ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"]
    assert_deltas_match(deltas, base, merged)


def test_bad_adapters_are_refused(tiny_llama, tmp_path):
    base_dir = tiny_llama(0)
    save_adapter(base_dir, tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ModelError, match="DoRA adapter"):
        Checkpoint.open(tmp_path / "dora", base=base_dir)
    save_adapter(
        base_dir, tmp_path / "plain", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    other_base = Checkpoint.open(tiny_llama(0, tie_word_embeddings=True, num_layers=1))
    with pytest.raises(
        ModelError, match="changes tensor 'model.layers.1.self_attn.q_proj.weight', which base"
    ):
        load_lora_task_vectors(tmp_path / "plain", other_base)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="names no base model"):
        Checkpoint.open(tmp_path / "plain")
