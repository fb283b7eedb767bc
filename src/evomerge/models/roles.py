"""Architecture introspection: which layer a tensor belongs to and what kind of block it is part of.

Table-driven so that supporting a new family means adding a row, not a branch: a tensor name is split
at its repeated-block container (`layers.N.`, `h.N.`, `blocks.N.`, `block.N.`, `layer.N.`), and the first name
component inside the block decides the kind. Names outside any block are matched against a short table
of embedding / head / final-norm patterns. Whatever prefix precedes the container (`model.`,
`transformer.`, `language_model.model.`, `vision_tower.encoder.`) is kept as `TensorRole.module`, so
multimodal models can tell their towers apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Kind = Literal["attention", "mlp", "norm", "embedding", "head", "other"]


@dataclass(frozen=True)
class TensorRole:
    """`layer` is the block index (None outside repeated blocks); `kind` the block part; `module` the
    dotted path of the block container the layer index counts in (e.g. `model.layers`), or "" for
    tensors outside any repeated block."""

    layer: int | None
    kind: Kind
    module: str = ""

    @property
    def prefix(self) -> str | None:
        """The name up to and including the layer index (`model.layers.3.`), None outside blocks."""
        return None if self.layer is None else f"{self.module}.{self.layer}."


# The one layer-index rule (the planner's layer renaming and the genome's layer groups use it too):
# `<prefix><container>.<index>.<rest>`; the prefix is lazy so the *first* container wins
# (`model.layers.3.mlp.experts.7.w1` is layer 3, not expert 7; T5's `block.0.layer.1.` is block 0).
_BLOCK = re.compile(r"^(?P<module>(?:.*?\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")

# First component inside a block -> kind. Order matters: norms are tested first because names like
# `post_attention_layernorm` or `self_attn_layer_norm` mention attention but hold norm weights.
_IN_BLOCK: tuple[tuple[re.Pattern[str], Kind], ...] = (
    (re.compile(r"^(ln_\d+|ln_attn|ln_mlp|.*norm\d*)$"), "norm"),  # input_layernorm, ln_1, layer_norm1
    (re.compile(r"^(self_attn|attn|attention|self_attention|cross_attn|encoder_attn)$"), "attention"),
    (re.compile(r"^(mlp|feed_forward|ffn|block_sparse_moe|moe|experts)$"), "mlp"),
)

# Tensors outside the repeated blocks, matched on the whole name (searched, so any prefix is allowed).
_OUTSIDE_BLOCKS: tuple[tuple[re.Pattern[str], Kind], ...] = (
    (re.compile(r"(^|\.)(lm_head|embed_out|output)\.weight$|(^|\.)lm_head\."), "head"),
    (re.compile(r"(norm|ln_f|layernorm|layer_norm)[^.]*\.(weight|bias)$"), "norm"),
    (
        re.compile(
            r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|embed_in|embed_positions|position_embedding|"
            r"patch_embedding|class_embedding|embeddings?)(\.|$)"
        ),
        "embedding",
    ),
)

# Per-family corrections for names the generic tables would misread.
_MODEL_TYPE_OVERRIDES: dict[str, tuple[tuple[re.Pattern[str], Kind], ...]] = {
    # Old GPT-2 checkpoints store the causal mask as `attn.bias` / `attn.masked_bias` buffers: they are
    # constants, not attention weights, and must never be merged.
    "gpt2": ((re.compile(r"\.attn\.(masked_)?bias$"), "other"),),
}


def with_layer(name: str, layer: int) -> str:
    """`model.layers.3.mlp.up_proj.weight` with its layer index replaced by `layer` (unchanged outside blocks)."""
    match = _BLOCK.match(name)
    return f"{match['module']}.{layer}.{match['rest']}" if match else name


def tensor_role(name: str, model_type: str | None = None) -> TensorRole:
    """Classify a checkpoint tensor name into (layer index, kind, block container).

    Examples: `model.layers.3.self_attn.q_proj.weight` -> (3, "attention", "model.layers");
    `transformer.h.0.ln_1.weight` -> (0, "norm", "transformer.h"); `lm_head.weight` -> (None, "head", "");
    `language_model.model.layers.1.mlp.up_proj.weight` -> (1, "mlp", "language_model.model.layers").
    `model_type` (config.json's) enables family-specific corrections, e.g. GPT-2's mask buffers -> "other".
    """
    match = _BLOCK.match(name)
    layer = int(match["index"]) if match else None
    module = match["module"] if match else ""
    for pattern, kind in _MODEL_TYPE_OVERRIDES.get(model_type or "", ()):
        if pattern.search(name):
            return TensorRole(layer, kind, module)
    if match:
        first = match["rest"].split(".", 1)[0]
        kind = next((k for pattern, k in _IN_BLOCK if pattern.match(first)), "other")
        return TensorRole(layer, kind, module)
    kind = next((k for pattern, k in _OUTSIDE_BLOCKS if pattern.search(name)), "other")
    return TensorRole(None, kind, "")
