"""`Checkpoint`: a lazily read model on disk (local directory or Hugging Face cache entry).

Opening a checkpoint reads `config.json` and the safetensors headers only, and validates every header
against its file's size, so corrupt or truncated downloads fail before a merge starts. Tensor data is
read one tensor at a time on `get`. Pickle weights (`.bin`/`.pt`) are refused unless the caller opts in,
because unpickling can run arbitrary code; when allowed they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from evomerge.errors import ModelError
from evomerge.models.roles import tensor_role
from evomerge.models.safetensors_header import TORCH_TO_SAFETENSORS
from evomerge.models.sources import (
    SafetensorsSource,
    TensorSource,
    open_weights,
    read_json,
    read_json_or_empty,
)
from evomerge.models.tokenizer import TOKENIZER_FILES, describe_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
# Files whose `auto_map` asks transformers to import code shipped with the model.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
_JSON_TYPES = {str: "string", list: "list", dict: "JSON object"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class Checkpoint:
    """A model on disk, read lazily: config, tensor metadata up front, tensor data on demand.

    Build with `Checkpoint.open(...)`. Attributes: `path` (the directory), `config` (config.json as a
    dict), `requires_remote_code` (config or tokenizer declares `auto_map`; recorded, never executed),
    `adapter` (the PEFT adapter directory when this is a "base + LoRA delta" view, else None),
    `config_dir` / `tokenizer_dir` (where config.json and the tokenizer files live: the base's for a view).
    """

    def __init__(
        self,
        path: Path,
        config: dict,
        source: TensorSource,
        *,
        tokenizer_dir: Path | None = None,
        config_dir: Path | None = None,
        adapter: Path | None = None,
    ) -> None:
        self.path = path
        self.config_dir = config_dir or path
        self.config = config
        self.adapter = adapter
        self._source = source
        self._infos = source.infos()
        self._names = sorted(self._infos)
        # A LoRA view has no tokenizer of its own unless the adapter ships one; the base's then applies.
        self._tokenizer_dir = tokenizer_dir or path
        self._content_hash: str | None = None
        # Checked at open, so a parent whose config disagrees with its tensors is refused even when
        # another parent's depth drives the merge.
        self._num_layers = self._config_layers()
        # Recorded here, refused by the commands that read the model (`refuse_remote_code`), never executed.
        self.remote_code_file = (
            self.config_dir / "config.json" if "auto_map" in config
            else remote_code_file(self._tokenizer_dir, names=("tokenizer_config.json",))
        )
        self.requires_remote_code = self.remote_code_file is not None

    @classmethod
    def open(
        cls,
        ref: str | Path,
        *,
        allow_pickle: bool = False,
        revision: str | None = None,
        allow_download: bool = False,
        base: Checkpoint | str | Path | None = None,
    ) -> Checkpoint:
        """Open a local HF-layout directory or a hub id (resolved in the local HF cache).

        `revision` selects a branch/tag/commit of a hub id; `allow_download=False` (default) never touches
        the network. If `ref` is a PEFT LoRA adapter directory, the result is a view whose tensors are
        `base + delta` (see `evomerge.models.lora`); `base` is that base model (a `Checkpoint` or a ref),
        defaulting to the adapter's `base_model_name_or_path`.
        """
        path = resolve_ref(ref, revision=revision, allow_download=allow_download)
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            # Imported here because the LoRA module builds on `Checkpoint` itself.
            from evomerge.models.lora import open_lora_view

            return open_lora_view(path, base, allow_pickle=allow_pickle, allow_download=allow_download)
        if base is not None:
            raise ModelError(f"{path} is not a PEFT adapter directory, so it takes no base model.")
        config = read_config(path)
        return cls(path, config, open_weights(path, allow_pickle=allow_pickle))

    # --- metadata -------------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        """config.json's `model_type` (e.g. "llama"), or None when absent."""
        return self.config.get("model_type")

    @property
    def architecture(self) -> str | None:
        """The first entry of config.json's `architectures` (e.g. "LlamaForCausalLM"), or None."""
        architectures = self.config.get("architectures") or [None]
        return architectures[0]

    @property
    def num_layers(self) -> int:
        """Number of repeated blocks: from the config (also a nested `text_config`), else from tensor names.

        A config depth that no block container of the tensors has is refused: the merge places every layer
        by its position in that depth, and a loader would leave the missing layers randomly initialised.
        """
        return self._num_layers

    def _config_layers(self) -> int:
        text_config = self.config.get("text_config")
        for config in (self.config, text_config if isinstance(text_config, dict) else {}):
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                value = config.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    depths = layer_depths(self._names)
                    if depths and value not in depths.values():
                        raise ModelError(
                            f"{self.config_dir / 'config.json'} declares {key} = {value} but the tensors of "
                            f"{self.path} hold {count_layers(self._names)} layers."
                        )
                    return value
        return count_layers(self._names)

    def tensor_names(self) -> list[str]:
        """All tensor names, sorted."""
        return list(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` (from the header; no data read)."""
        return self._info(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor `name` (from the header; no data read)."""
        return self._info(name)[0]

    def _info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelError(f"{self.path} has no tensor named {name!r}.") from None

    # --- data -----------------------------------------------------------------------------------
    def get(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one tensor, optionally moved to `device` and cast to `dtype`."""
        self._info(name)
        tensor = self._source.load(name)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def release(self, name: str) -> None:
        """Give back the memory a `get` of tensor `name` mapped in; views of it stay valid (they re-read)."""
        self._info(name)
        if isinstance(self._source, SafetensorsSource):
            self._source.release(name)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) in sorted name order, one tensor resident at a time."""
        for name in self._names:
            yield name, self.get(name)

    def content_hash(self) -> str:
        """sha256 over (name, dtype, shape, raw bytes) in sorted name order; cached after the first call.

        Independent of file layout (sharding, safetensors vs pickle), so it identifies the weights
        themselves — the model identity of `models.identity`.
        """
        if self._content_hash is None:
            digest = hashlib.sha256()
            for name, tensor in self.iter_tensors():
                digest.update(tensor_record_header(name, tensor))
                digest.update(tensor_bytes(tensor))
            self._content_hash = digest.hexdigest()
        return self._content_hash

    def file_fingerprint(self) -> str:
        """Cheap change detector: sha256 of weight-file sizes, mtimes and header hashes plus the
        config/tokenizer files' sizes and mtimes. Equal fingerprints mean `content_hash` need not be redone."""
        digest = hashlib.sha256()
        for part in self._source.fingerprint_parts():
            digest.update(part + b"\n")
        for directory in dict.fromkeys((self.config_dir, self._tokenizer_dir)):
            for name in ("config.json", *TOKENIZER_FILES):
                file = directory / name
                if file.is_file():
                    stat = file.stat()
                    digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    # --- tokenizer ------------------------------------------------------------------------------
    def tokenizer_fingerprint(self) -> str | None:
        """sha256 of the vocabulary (token -> id, sorted), added tokens and special tokens; None without
        tokenizer files. Two models with equal fingerprints index embedding rows identically."""
        description = describe_tokenizer(self._tokenizer_dir)
        if description is None:
            return None
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def vocabulary(self) -> dict[str, int] | None:
        """Token -> id (added tokens included), or None without tokenizer files."""
        description = describe_tokenizer(self._tokenizer_dir)
        return None if description is None else dict(description["vocab"])

    @property
    def tokenizer_dir(self) -> Path:
        """The directory holding this model's tokenizer files (the base's for a LoRA view)."""
        return self._tokenizer_dir

    def __repr__(self) -> str:
        suffix = f", adapter={str(self.adapter)!r}" if self.adapter else ""
        return f"Checkpoint({str(self.path)!r}{suffix})"


# --- helpers (module-level so they can be tested and reused by the LoRA view) -------------------------
def resolve_ref(ref: str | Path, *, revision: str | None, allow_download: bool) -> Path:
    """Turn a local path or hub id into a local directory; raise `ModelError` naming `ref` otherwise."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(
                f"{path} is a file; a model reference must be a directory in Hugging Face layout."
            )
        return path.resolve()
    text = str(ref)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelError(f"Model directory {path} does not exist.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=not allow_download))
    except LocalEntryNotFoundError as error:
        hint = "" if allow_download else " (downloads are off; allow them to fetch it)"
        raise ModelError(
            f"Model {text!r} is neither a local directory nor in the Hugging Face cache{hint}."
        ) from error
    except (HFValidationError, OSError, ValueError) as error:
        raise ModelError(f"Cannot resolve model {text!r}: {error}".split("\n")[0] + ".") from error


def read_config(path: Path) -> dict:
    """Read `config.json` of a model directory; raise `ModelError` naming the file."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelError(f"{path} has no config.json, so it is not a Hugging Face model directory.")
    config = read_json(file)
    if not isinstance(config, dict):
        raise ModelError(f"{file} must hold a JSON object.")
    # The fields evomerge reads to recognise the model, checked once here instead of at every use.
    for field, expected in (("model_type", str), ("architectures", list), ("text_config", dict)):
        value = config.get(field)
        if value is not None and not isinstance(value, expected):
            raise ModelError(f"{file}: field {field!r} must be a {_JSON_TYPES[expected]}, got {value!r}.")
    if not all(isinstance(name, str) for name in config.get("architectures") or []):
        raise ModelError(f"{file}: field 'architectures' must list class names, got {config['architectures']!r}.")
    return config


def layer_depths(names: list[str]) -> dict[str, int]:
    """Depth (1 + the highest layer index) of every block container, the one holding most tensors first."""
    layers = [(role.module, role.layer) for role in map(tensor_role, names) if role.layer is not None]
    sizes = Counter(module for module, _ in layers)
    return {
        module: 1 + max(layer for owner, layer in layers if owner == module) for module, _ in sizes.most_common()
    }


def count_layers(names: list[str]) -> int:
    """Layers of the block container holding the most tensors (the language model in a multimodal model)."""
    return next(iter(layer_depths(names).values()), 0)


def remote_code_file(directory: Path, names: tuple[str, ...] = REMOTE_CODE_FILES) -> Path | None:
    """The first file of `names` in `directory` whose JSON object declares `auto_map` (code shipped with it)."""
    for name in names:
        if "auto_map" in read_json_or_empty(directory / name):
            return directory / name
    return None


def refuse_remote_code(model: Checkpoint | Path) -> None:
    """Refuse a model whose config or tokenizer config maps the auto classes to code shipped with it.

    evomerge never runs that code; reading such a model with the built-in classes would use (or, merged,
    pass on) a different model than its author's code defines, so every command refuses it instead.
    """
    file = model.remote_code_file if isinstance(model, Checkpoint) else remote_code_file(Path(model))
    if file is not None:
        path = model.path if isinstance(model, Checkpoint) else model
        raise ModelError(
            f"model {path} asks for its own code (auto_map in {file.name}), which evomerge never runs; "
            "remove auto_map to load it with the built-in transformers classes"
        )


def tensor_record_header(name: str, tensor: torch.Tensor) -> bytes:
    """The per-tensor prefix hashed before the bytes: name, safetensors dtype code and shape."""
    code = TORCH_TO_SAFETENSORS.get(tensor.dtype, str(tensor.dtype))
    return f"{name}\0{code}\0{list(tensor.shape)}\0".encode()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
