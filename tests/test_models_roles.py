"""tensor_role over the naming schemes of the supported families, and on real checkpoints' names."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from evomerge.models import Checkpoint, TensorRole, tensor_role, with_layer

CASES = [
    # Llama / Mistral / Qwen2
    ("model.embed_tokens.weight", None, TensorRole(None, "embedding")),
    ("model.layers.0.self_attn.q_proj.weight", None, TensorRole(0, "attention", "model.layers")),
    ("model.layers.11.self_attn.k_proj.bias", None, TensorRole(11, "attention", "model.layers")),
    ("model.layers.3.mlp.down_proj.weight", None, TensorRole(3, "mlp", "model.layers")),
    ("model.layers.3.input_layernorm.weight", None, TensorRole(3, "norm", "model.layers")),
    ("model.layers.3.post_attention_layernorm.weight", None, TensorRole(3, "norm", "model.layers")),
    ("model.norm.weight", None, TensorRole(None, "norm")),
    ("lm_head.weight", None, TensorRole(None, "head")),
    # Gemma2's four norms per block
    ("model.layers.5.pre_feedforward_layernorm.weight", "gemma2", TensorRole(5, "norm", "model.layers")),
    ("model.layers.5.post_feedforward_layernorm.weight", "gemma2", TensorRole(5, "norm", "model.layers")),
    # Mixtral: the first container wins over the expert index
    ("model.layers.2.block_sparse_moe.experts.7.w1.weight", None, TensorRole(2, "mlp", "model.layers")),
    # GPT-2
    ("transformer.wte.weight", "gpt2", TensorRole(None, "embedding")),
    ("transformer.wpe.weight", "gpt2", TensorRole(None, "embedding")),
    ("transformer.h.0.attn.c_attn.weight", "gpt2", TensorRole(0, "attention", "transformer.h")),
    ("transformer.h.0.mlp.c_fc.bias", "gpt2", TensorRole(0, "mlp", "transformer.h")),
    ("transformer.h.1.ln_1.weight", "gpt2", TensorRole(1, "norm", "transformer.h")),
    ("transformer.h.1.ln_2.bias", "gpt2", TensorRole(1, "norm", "transformer.h")),
    ("transformer.ln_f.weight", "gpt2", TensorRole(None, "norm")),
    ("transformer.h.1.attn.bias", "gpt2", TensorRole(1, "other", "transformer.h")),  # causal-mask buffer
    ("transformer.h.1.attn.bias", None, TensorRole(1, "attention", "transformer.h")),
    # Llava: prefixed language tower, vision tower with its own layer count, projector
    (
        "language_model.model.layers.3.self_attn.o_proj.weight",
        "llava",
        TensorRole(3, "attention", "language_model.model.layers"),
    ),
    ("language_model.lm_head.weight", "llava", TensorRole(None, "head")),
    ("language_model.model.embed_tokens.weight", "llava", TensorRole(None, "embedding")),
    (
        "vision_tower.encoder.layers.1.layer_norm2.bias",
        "llava",
        TensorRole(1, "norm", "vision_tower.encoder.layers"),
    ),
    ("vision_tower.embeddings.patch_embedding.weight", "llava", TensorRole(None, "embedding")),
    ("vision_tower.pre_layrnorm.weight", "llava", TensorRole(None, "norm")),
    ("multi_modal_projector.linear_1.weight", "llava", TensorRole(None, "other")),
    # Generic containers
    ("blocks.4.attn.qkv.weight", None, TensorRole(4, "attention", "blocks")),
    ("backbone.blocks.4.ffn.w2.weight", None, TensorRole(4, "mlp", "backbone.blocks")),
    ("h.2.something.weight", None, TensorRole(2, "other", "h")),
    ("rotary.inv_freq", None, TensorRole(None, "other")),
]


@pytest.mark.parametrize(("name", "model_type", "expected"), CASES, ids=[c[0] for c in CASES])
def test_tensor_role_table(name, model_type, expected):
    assert tensor_role(name, model_type) == expected


def test_every_tensor_of_a_real_llama_gets_a_specific_kind(tiny_llama):
    checkpoint = Checkpoint.open(tiny_llama(0))
    roles = {name: tensor_role(name, checkpoint.model_type) for name in checkpoint.tensor_names()}
    assert all(role.kind != "other" for role in roles.values())
    assert {role.layer for role in roles.values()} == {None, 0, 1, 2, 3}
    # Each block holds the same parts as the module tree transformers builds.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(0))
    per_layer = {n for n, _ in model.model.layers[0].named_parameters()}
    assert {n.split("model.layers.0.", 1)[1] for n, r in roles.items() if r.layer == 0} == per_layer


def test_llava_layers_are_counted_per_tower(tiny_llava):
    checkpoint = Checkpoint.open(tiny_llava)
    roles = [tensor_role(name, checkpoint.model_type) for name in checkpoint.tensor_names()]
    towers = {}
    for role in roles:
        if role.layer is not None:
            towers.setdefault(role.module, set()).add(role.layer)
    assert towers == {"language_model.model.layers": {0, 1, 2, 3}, "vision_tower.encoder.layers": {0, 1}}
    assert checkpoint.num_layers == 4  # from text_config


@pytest.mark.parametrize(
    ("name", "prefix", "renamed"),
    [
        ("model.layers.3.mlp.up_proj.weight", "model.layers.3.", "model.layers.7.mlp.up_proj.weight"),
        ("transformer.h.0.ln_1.weight", "transformer.h.0.", "transformer.h.7.ln_1.weight"),
        ("bert.encoder.layer.2.attention.self.query.weight", "bert.encoder.layer.2.",
         "bert.encoder.layer.7.attention.self.query.weight"),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "encoder.block.0.",
         "encoder.block.7.layer.1.DenseReluDense.wi.weight"),
        ("lm_head.weight", None, "lm_head.weight"),
    ],
)
def test_one_layer_index_rule_for_prefixes_and_renaming(name, prefix, renamed):
    assert tensor_role(name).prefix == prefix
    assert with_layer(name, 7) == renamed
