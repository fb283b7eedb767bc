"""PEFT LoRA adapters as task vectors, and as "base + delta" checkpoint views.

A LoRA adapter trained on a base model *is* a task vector in factored form: for an adapted linear layer
`W' = W + s * B @ A` with `s = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). Reading adapters this way
lets every task-arithmetic operator use them without first writing a merged full-size model to disk.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import ModelError
from evomerge.models.checkpoint import ADAPTER_CONFIG, Checkpoint
from evomerge.models.sources import PickleSource, TensorSource, open_safetensors_file
from evomerge.models.tokenizer import TOKENIZER_FILES

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Saved key suffix -> (factor, suffix of the base tensor it updates). `.default` adapter names are
# stripped by PEFT on save, so they do not appear here.
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$"
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factor tensors' adapter keys and the scale applied to `B @ A`."""

    module: str  # the module's name in the base model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    bias_key: str | None
    embedding: bool
    scale: float


class LoraTaskVectors(Mapping[str, torch.Tensor]):
    """Lazy mapping: base tensor name -> float32 delta (`W_merged - W_base`), computed on access.

    Linear layers: `delta = s * B @ A` (transposed when `fan_in_fan_out`, i.e. GPT-2's Conv1D layout);
    LoRA biases: `delta = s * b_B`; embeddings: `delta = s * (B @ A).T` (PEFT stores embedding factors as
    A: [r, num_embeddings], B: [dim, r]); saved full tensors (`modules_to_save`, PEFT's copy of an adapted
    embedding): `saved - base`. Parts touching the same tensor are summed.
    """

    def __init__(self, adapter_dir: Path, base: Checkpoint, adapter: Checkpoint, config: dict) -> None:
        self.adapter_dir = adapter_dir
        self.config = config
        self._base = base
        self._adapter = adapter
        self._fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self._parts: dict[str, list[tuple[str, LoraModule | str]]] = {}
        self._index(adapter.tensor_names())

    def _index(self, keys: list[str]) -> None:
        """Map every adapter key to the base tensor it changes; raise `ModelError` on anything unknown."""
        modules: dict[str, dict[str, str]] = {}
        for key in keys:
            if not key.startswith(PEFT_PREFIX):
                raise ModelError(
                    f"{self.adapter_dir}: adapter tensor {key!r} does not start with {PEFT_PREFIX!r}."
                )
            match = _LORA_KEY.match(key[len(PEFT_PREFIX) :])
            if match:
                modules.setdefault(match["module"], {})[match["factor"]] = key
            else:
                # A full tensor: `modules_to_save`, or the embedding PEFT saves as `<module>.base_layer.weight`
                # when it adapts (and may have resized) an embedding.
                name = key[len(PEFT_PREFIX) :].replace(".base_layer.", ".")
                self._add(name, ("full", key), self._adapter.shape(key))
        for module, factors in sorted(modules.items()):
            lora, shape = self._module(module, factors)
            self._add(f"{module}.weight", ("lora", lora), shape)
            if lora.bias_key:
                self._add(f"{module}.bias", ("bias", lora), self._adapter.shape(lora.bias_key))

    def _add(self, name: str, part: tuple[str, LoraModule | str], shape: tuple[int, ...]) -> None:
        """Record a part of tensor `name`'s delta, its shape checked against the base from the headers."""
        if name not in self._base:
            raise ModelError(
                f"{self.adapter_dir}: adapter changes tensor {name!r}, which base {self._base.path} lacks."
            )
        if tuple(shape) != self._base.shape(name):
            raise ModelError(
                f"{self.adapter_dir}: the delta for tensor {name!r} has shape {tuple(shape)} but the base "
                f"tensor has {self._base.shape(name)}."
            )
        self._parts.setdefault(name, []).append(part)

    def _module(self, module: str, factors: dict[str, str]) -> tuple[LoraModule, tuple[int, int]]:
        """One adapted module and the shape of its delta, both checked from the headers before any read."""
        embedding = "lora_embedding_A" in factors
        a_name, b_name = (
            ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        )
        if a_name not in factors or b_name not in factors:
            raise ModelError(f"{self.adapter_dir}: module {module!r} lacks one of its LoRA factors A and B.")
        a_shape, b_shape = self._adapter.shape(factors[a_name]), self._adapter.shape(factors[b_name])
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise ModelError(
                f"{self.adapter_dir}: module {module!r} has a LoRA factor that is not 2-D; only linear "
                "and embedding LoRA layers are supported."
            )
        rank = a_shape[0]
        if rank == 0 or b_shape[1] != rank:
            raise ModelError(
                f"{self.adapter_dir}: module {module!r} has factors of ranks {rank} (A {list(a_shape)}) and "
                f"{b_shape[1]} (B {list(b_shape)}); they must be equal and positive."
            )
        bias_key = factors.get("lora_B.bias")
        if bias_key is not None and self._adapter.shape(bias_key) != (b_shape[0],):
            raise ModelError(
                f"{self.adapter_dir}: LoRA bias {bias_key!r} has shape {list(self._adapter.shape(bias_key))}, "
                f"expected [{b_shape[0]}]."
            )
        alpha = self._pattern(module, self.config.get("lora_alpha", 8))
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ModelError(
                f"{self.adapter_dir / ADAPTER_CONFIG}: the lora_alpha of module {module!r} must be a finite "
                f"number, got {alpha!r}."
            )
        scale = alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank
        shape = (b_shape[0], a_shape[1])
        if embedding or self._fan_in_fan_out:
            shape = shape[::-1]
        return LoraModule(module, factors[a_name], factors[b_name], bias_key, embedding, scale), shape

    def _pattern(self, module: str, default: object) -> object:
        """PEFT's per-module override: the first `alpha_pattern` key matching a dotted suffix of the module."""
        patterns = self.config.get("alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise ModelError(f"{self.adapter_dir / ADAPTER_CONFIG}: field 'alpha_pattern' must be an object.")
        for key, value in patterns.items():
            try:
                if re.match(rf"(.*\.)?({key})$", module):
                    return value
            except re.error as error:
                raise ModelError(
                    f"{self.adapter_dir / ADAPTER_CONFIG}: alpha_pattern key {key!r} is not a valid pattern ({error})."
                ) from None
        return default

    def __getitem__(self, name: str) -> torch.Tensor:
        return sum(
            (self._part_delta(name, kind, entry) for kind, entry in self._parts[name]), torch.zeros(())
        )

    def _part_delta(self, name: str, kind: str, entry: LoraModule | str) -> torch.Tensor:
        if isinstance(entry, str):  # a full saved tensor replaces the base one
            return self._adapter.get(entry, dtype=torch.float32) - self._base.get(name, dtype=torch.float32)
        if kind == "bias":
            return entry.scale * self._adapter.get(entry.bias_key, dtype=torch.float32)
        # Shapes were checked against the base when the adapter was indexed.
        product = self._adapter.get(entry.b_key, dtype=torch.float32) @ self._adapter.get(
            entry.a_key, dtype=torch.float32
        )
        return entry.scale * (product.T if entry.embedding or self._fan_in_fan_out else product)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._parts))

    def __len__(self) -> int:
        return len(self._parts)


def read_adapter_config(adapter_dir: Path) -> dict:
    """Read and check `adapter_config.json`: a plain LoRA adapter (DoRA and other PEFT types refused)."""
    file = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"Cannot read adapter config {file}: {error}.") from error
    if not isinstance(config, dict):
        raise ModelError(f"{file} must hold a JSON object.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(
            f"{file} describes a {config['peft_type']} adapter; only LoRA adapters are supported."
        )
    if config.get("use_dora"):
        raise ModelError(
            f"{file} describes a DoRA adapter, whose update is not a fixed delta; it is not supported."
        )
    return config


def load_lora_task_vectors(
    adapter_dir: str | Path, base: Checkpoint, *, allow_pickle: bool = False
) -> LoraTaskVectors:
    """Read a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) as lazy task vectors
    keyed by base tensor names. Raises `ModelError` if a factor is missing or a target is absent in `base`."""
    directory = Path(adapter_dir)
    config = read_adapter_config(directory)
    source = _open_adapter_weights(directory, allow_pickle=allow_pickle)
    adapter = Checkpoint(directory, config, source)
    return LoraTaskVectors(directory, base, adapter, config)


def _open_adapter_weights(directory: Path, *, allow_pickle: bool) -> TensorSource:
    """Adapter weights have their own file names but the same safety rules as full checkpoints."""
    safetensors_file, pickle_file = (directory / name for name in ADAPTER_WEIGHTS)
    if safetensors_file.is_file():
        return open_safetensors_file(safetensors_file)
    if not pickle_file.is_file():
        raise ModelError(f"{directory} has no adapter weights: expected {ADAPTER_WEIGHTS[0]}.")
    if not allow_pickle:
        raise ModelError(f"{pickle_file} is a pickle checkpoint; pass --allow-pickle to load it.")
    return PickleSource([pickle_file])


class LoraViewSource:
    """Tensor source for "base + LoRA delta": the base's names, shapes and dtypes, merged on `load`."""

    def __init__(self, base: Checkpoint, deltas: LoraTaskVectors) -> None:
        self._base = base
        self._deltas = deltas

    def infos(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (self._base.dtype(name), self._base.shape(name)) for name in self._base.tensor_names()}

    def load(self, name: str) -> torch.Tensor:
        tensor = self._base.get(name)
        if name not in self._deltas:
            return tensor
        # Add in float32 so a bf16 base does not lose the (small) delta to rounding twice.
        return (tensor.to(torch.float32) + self._deltas[name]).to(tensor.dtype)

    def fingerprint_parts(self) -> list[bytes]:
        parts = [self._base.file_fingerprint().encode()]
        for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
            file = self._deltas.adapter_dir / name
            if file.is_file():
                parts.append(f"{name}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())
        return parts


def open_lora_view(
    adapter_dir: Path,
    base: Checkpoint | str | Path | None,
    *,
    allow_pickle: bool,
    allow_download: bool,
) -> Checkpoint:
    """`Checkpoint` of `base + delta` for a LoRA adapter; the base defaults to the adapter's
    `base_model_name_or_path`. Config and (unless the adapter ships one) tokenizer come from the base."""
    config = read_adapter_config(adapter_dir)
    if base is None:
        base = config.get("base_model_name_or_path")
        if not base or not isinstance(base, str):
            raise ModelError(f"{adapter_dir / ADAPTER_CONFIG} names no base model; pass the base explicitly.")
    if not isinstance(base, Checkpoint):
        base = Checkpoint.open(base, allow_pickle=allow_pickle, allow_download=allow_download)
    deltas = load_lora_task_vectors(adapter_dir, base, allow_pickle=allow_pickle)
    has_tokenizer = any((adapter_dir / name).is_file() for name in TOKENIZER_FILES)
    return Checkpoint(
        adapter_dir,
        dict(base.config),
        LoraViewSource(base, deltas),
        tokenizer_dir=adapter_dir if has_tokenizer else base.tokenizer_dir,
        config_dir=base.config_dir,
        adapter=adapter_dir,
    )
