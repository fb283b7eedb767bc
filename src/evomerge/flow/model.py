"""`PathModel`: a causal LM that runs a `PathSpec` through the live decoder layers of its sources.

No weight is copied: the path model registers the sources' own modules. It uses model A's (source 0's)
token embeddings, final norm, lm_head and rotary embedding, as the paper does; the sources must agree on
every architecture field that the path's shared parts depend on (see `check_path_sources`).

KV cache: transformers' attention files keys/values under its own ``layer_idx``, so a layer that occurs
twice on the path would overwrite its first occurrence's cache. Each step therefore sees the cache through
a small view that files its update under the step number: the cache holds one slot per *path step*, and
``model.config.num_hidden_layers`` is the path length, so ``DynamicCache(config=model.config)`` fits.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from evomerge.errors import ConfigError
from evomerge.flow.spec import PathSpec

#: Architectures whose decoder layers share Llama's call signature and pre-norm block with
#: scale-invariant RMSNorm (needed by `export_path`), and whose models apply nothing between the embedding
#: lookup and the first layer (Gemma, for one, multiplies embeddings by sqrt(hidden_size) there).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: Config fields every source must share: the path runs one token embedding, one rotary embedding and one
#: mask per attention kind, and an exported path is a single homogeneous config.
SHARED_CONFIG_FIELDS = (
    "model_type",
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "rms_norm_eps",
    "rope_parameters",
    "sliding_window",
    "_attn_implementation",
)


def check_path_sources(configs: Sequence[PretrainedConfig], spec: PathSpec) -> None:
    """Raise `ConfigError` unless the source configs can run (and be exported as) the path `spec`."""
    if len(configs) != spec.num_sources:
        raise ConfigError(f"the path spec names {spec.num_sources} sources but {len(configs)} were given.")
    for index, config in enumerate(configs):
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"source {index} has model_type '{config.model_type}'; layer paths support only "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (pre-norm blocks with scale-invariant RMSNorm)."
            )
        if config.is_heterogeneous:
            raise ConfigError(
                f"source {index} has a heterogeneous per-layer config, which layer paths do not support."
            )
        if config.num_hidden_layers != spec.layers_per_source[index]:
            raise ConfigError(
                f"source {index} has {config.num_hidden_layers} layers but the path spec says "
                f"{spec.layers_per_source[index]}."
            )
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED_CONFIG_FIELDS:
            mine, theirs = getattr(first, name, None), getattr(config, name, None)
            if mine == theirs:
                continue
            if name == "hidden_size":
                raise ConfigError(
                    f"sources of different hidden size cannot share a path: {mine} (source 0) vs {theirs} (source {index})."
                )
            raise ConfigError(
                f"sources 0 and {index} differ in config field '{name}' ({mine!r} vs {theirs!r})."
            )


def step_layer_types(configs: Sequence[PretrainedConfig], spec: PathSpec) -> list[str]:
    """The attention kind ("full_attention" / "sliding_attention") of each path step, from its source."""
    kinds = []
    for source, layer in spec.steps:
        config = configs[source]
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            kinds.append(layer_types[layer])
        else:
            # Mistral-style configs: one sliding window (or none) for every layer.
            kinds.append("sliding_attention" if getattr(config, "sliding_window", None) else "full_attention")
    return kinds


def path_config(configs: Sequence[PretrainedConfig], spec: PathSpec) -> PretrainedConfig:
    """Source A's config rebuilt for the path's depth: `num_hidden_layers` and per-layer `layer_types`."""
    config = copy.deepcopy(configs[0])
    config.num_hidden_layers = len(spec)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = step_layer_types(configs, spec)
    return config


class _StepCache:
    """A view of a `Cache` that files every key/value update under one path step's slot.

    Only `update` is exposed on purpose: any other cache call from inside a layer would carry the layer's
    own index, so it should fail loudly rather than read another step's slot.
    """

    def __init__(self, cache: Cache, slot: int) -> None:
        self._cache = cache
        self._slot = slot

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store under the step's slot, ignoring the layer's own `layer_idx`."""
        return self._cache.update(key_states, value_states, self._slot, *args, **kwargs)


class PathModel(nn.Module):
    """A causal LM whose decoder stack is a layer path through several loaded source models.

    ``forward`` follows `LlamaForCausalLM.forward` (input ids, attention mask, position ids, a `Cache`,
    ``use_cache``, ``logits_to_keep``) and returns a `CausalLMOutputWithPast`, so code that drives a
    Hugging Face causal LM (batched greedy decoding with left padding and a `DynamicCache`) drives this
    too. Step k multiplies the hidden state entering it by ``spec.scales[k]``.
    """

    def __init__(self, sources: Sequence[PreTrainedModel], spec: PathSpec) -> None:
        super().__init__()
        configs = [source.config for source in sources]
        check_path_sources(configs, spec)
        model_a = sources[0]
        self.spec = spec
        self.config = path_config(configs, spec)
        self.source_configs = tuple(configs)
        # Model A's shared parts, registered (not copied) so `.to()` / `.parameters()` see them.
        self.embed_tokens = model_a.get_input_embeddings()
        self.norm = model_a.model.norm
        self.rotary_emb = model_a.model.rotary_emb
        self.lm_head = model_a.get_output_embeddings()
        # Decoding loops read EOS ids from here (as `generate` does); the path speaks model A's tokens.
        self.generation_config = getattr(model_a, "generation_config", None)
        # Each distinct (source, layer) is registered once; steps index into this list.
        distinct = list(dict.fromkeys(spec.steps))
        self.layers = nn.ModuleList(sources[s].model.layers[l] for s, l in distinct)
        self._step_modules = tuple(distinct.index(step) for step in spec.steps)
        self._step_kinds = tuple(step_layer_types(configs, spec))

    @property
    def device(self) -> torch.device:
        """Device of the token embeddings (where inputs must live)."""
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the token embeddings."""
        return self.embed_tokens.weight.dtype

    def step_layer(self, step: int) -> nn.Module:
        """The (shared) decoder layer module that path step `step` runs."""
        return self.layers[self._step_modules[step]]

    def _masks(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
    ) -> dict[str, Any]:
        """One attention mask per attention kind on the path, built the way the source models build them."""
        builders = {
            "full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask,
        }
        return {
            kind: builders[kind](
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )
            for kind in set(self._step_kinds)
        }

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run the path; with a cache, only the new tokens are fed and their keys/values appended per step."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden_states = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(hidden_states.shape[1], device=hidden_states.device) + past_seen
            ).unsqueeze(0)
        masks = self._masks(hidden_states, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for step, (scale, kind) in enumerate(zip(self.spec.scales, self._step_kinds)):
            hidden_states = self.step_layer(step)(
                hidden_states * scale,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=None if cache is None else _StepCache(cache, step),
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        # logits_to_keep = 0 keeps every position (slice(-0, None)), as in transformers.
        logits = self.lm_head(hidden_states[:, -logits_to_keep:, :])
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)
