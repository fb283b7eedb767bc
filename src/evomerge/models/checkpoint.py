"""`Checkpoint`: a lazily read model on disk (local directory or Hugging Face cache entry).

Opening a checkpoint reads `config.json` and the safetensors headers only, and validates every header
against its file's size, so corrupt or truncated downloads fail before a merge starts. Tensor data is
read one tensor at a time on `get`. Pickle weights (`.bin`/`.pt`) are refused unless the caller opts in,
because unpickling can run arbitrary code; when allowed they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from evomerge.errors import ModelError
from evomerge.models.roles import tensor_role
from evomerge.models.safetensors_header import TORCH_TO_SAFETENSORS, TensorInfo, read_header

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"

# Files that describe a tokenizer; any of them present means the model ships one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# Keys of tokenizer_config.json / special_tokens_map.json naming special tokens.
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class TensorSource(Protocol):
    """Backend of a `Checkpoint`: where tensors come from (safetensors, pickle, base + LoRA delta)."""

    def infos(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) for every tensor, known without reading data."""
        ...

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor onto the CPU in its stored dtype."""
        ...

    def fingerprint_parts(self) -> list[bytes]:
        """Cheap byte strings that change when the underlying files change (sizes, mtimes, headers)."""
        ...


class SafetensorsSource:
    """Tensors from one or more validated safetensors files, memory-mapped lazily on first read."""

    def __init__(self, tensors: dict[str, TensorInfo], headers: dict[Path, bytes]) -> None:
        self._tensors = tensors
        self._headers = headers
        self._maps: dict[Path, mmap.mmap] = {}

    def infos(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (info.dtype, info.shape) for name, info in self._tensors.items()}

    def load(self, name: str) -> torch.Tensor:
        """The tensor as a view of the file's memory map: no copy until the caller copies or casts it.

        The mapping is private (copy-on-write), so a caller writing into the view never touches the file.
        Headers were validated against the file size at open, so every view lies inside the file.
        """
        info = self._tensors[name]
        try:
            if info.file not in self._maps:
                with info.file.open("rb") as handle:
                    self._maps[info.file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            count = math.prod(info.shape)
            if count == 0:
                return torch.empty(info.shape, dtype=info.dtype)
            flat = torch.frombuffer(self._maps[info.file], dtype=info.dtype, count=count, offset=info.offset)
            return flat.view(info.shape)
        except (OSError, ValueError) as error:
            raise ModelError(f"Cannot read tensor {name!r} from {info.file}: {error}.") from error

    def release(self, name: str) -> None:
        """Unmap the pages that lie wholly inside the tensor's data; a later `load` maps them again.

        Mapped pages count as the process's resident memory until unmapped: without this, a streaming
        merge's resident set grew by every parent's whole size (benchmarks/RESULTS.md). The mapping is
        private and never written, so the pages come back unchanged from the file.
        """
        info = self._tensors[name]
        mapping = self._maps.get(info.file)
        start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if mapping is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def fingerprint_parts(self) -> list[bytes]:
        parts = []
        for file, raw in sorted(self._headers.items()):
            stat = file.stat()
            parts.append(
                f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}:".encode() + hashlib.sha256(raw).digest()
            )
        return parts


class PickleSource:
    """Tensors from `torch.load(weights_only=True)` state dicts, memory-mapped where the format allows."""

    def __init__(self, files: list[Path]) -> None:
        self._files = files
        self._tensors: dict[str, torch.Tensor] = {}
        for file in files:
            for name, tensor in _load_pickle(file).items():
                if name in self._tensors:
                    raise ModelError(f"{file} repeats tensor {name!r} already stored in another weight file.")
                self._tensors[name] = tensor

    def infos(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def fingerprint_parts(self) -> list[bytes]:
        return [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode() for f in sorted(self._files)]


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickle state dict safely; mmap keeps RAM flat for zip-format files (the torch default)."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Legacy (non-zip) files cannot be memory-mapped; read them whole.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise ModelError(f"Cannot load pickle checkpoint {file}: {error}".split("\n")[0] + ".") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{file} does not hold a state dict of tensors.")
    return state


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
        self.requires_remote_code = "auto_map" in config or "auto_map" in _read_json_or_empty(
            self._tokenizer_dir / "tokenizer_config.json"
        )

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
        """Number of repeated blocks: from the config (also a nested `text_config`), else from tensor names."""
        for config in (self.config, self.config.get("text_config") or {}):
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if isinstance(config.get(key), int):
                    return config[key]
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
        themselves — the model identity used by the lineage store.
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
    config = _read_json(file)
    if not isinstance(config, dict):
        raise ModelError(f"{file} must hold a JSON object.")
    return config


def open_weights(path: Path, *, allow_pickle: bool) -> TensorSource:
    """Find and validate the weight files of `path` (safetensors preferred, pickle only if allowed)."""
    if (path / SAFETENSORS_INDEX).is_file():
        return _open_sharded_safetensors(path / SAFETENSORS_INDEX)
    if (path / SAFETENSORS_SINGLE).is_file():
        return open_safetensors_file(path / SAFETENSORS_SINGLE)
    pickles = _pickle_files(path)
    if pickles:
        if not allow_pickle:
            raise ModelError(
                f"{pickles[0]} is a pickle checkpoint; pass --allow-pickle to load it "
                "(unpickling can run arbitrary code)."
            )
        return PickleSource(pickles)
    raise ModelError(f"{path} has no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}.")


def open_safetensors_file(file: Path) -> SafetensorsSource:
    """A source over one validated safetensors file."""
    header = read_header(file)
    return SafetensorsSource(header.tensors, {file: header.raw})


def _open_sharded_safetensors(index_file: Path) -> SafetensorsSource:
    """Validate an index: it parses, its shards exist, and it lists exactly the tensors the shards hold."""
    index = _read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index_file} has no 'weight_map' object.")
    tensors: dict[str, TensorInfo] = {}
    headers: dict[Path, bytes] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_file.parent / str(shard_name)
        if not shard.is_file():
            raise ModelError(f"{index_file} refers to shard {shard_name!r}, which does not exist.")
        header = read_header(shard)
        headers[shard] = header.raw
        for name, info in header.tensors.items():
            if name in tensors:
                raise ModelError(
                    f"Tensor {name!r} is stored twice, in {tensors[name].file.name} and {shard.name}."
                )
            if weight_map.get(name) != shard_name:
                raise ModelError(f"{index_file} does not list tensor {name!r} stored in shard {shard_name}.")
            tensors[name] = info
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ModelError(
            f"{index_file} lists tensor {missing[0]!r} in shard {weight_map[missing[0]]}, which does not hold it."
        )
    return SafetensorsSource(tensors, headers)


def _pickle_files(path: Path) -> list[Path]:
    """Pickle weight files of a directory, from an index when present."""
    if (path / PICKLE_INDEX).is_file():
        index = _read_json(path / PICKLE_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelError(f"{path / PICKLE_INDEX} has no 'weight_map' object.")
        files = [path / str(name) for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ModelError(
                    f"{path / PICKLE_INDEX} refers to shard {file.name!r}, which does not exist."
                )
        return files
    if (path / PICKLE_SINGLE).is_file():
        return [path / PICKLE_SINGLE]
    return sorted(path.glob("*.pt")) + sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{file} is not valid JSON: {error}.") from error
    except OSError as error:
        raise ModelError(f"Cannot read {file}: {error.strerror or error}.") from error


def _read_json_or_empty(file: Path) -> dict:
    if not file.is_file():
        return {}
    data = _read_json(file)
    return data if isinstance(data, dict) else {}


def count_layers(names: list[str]) -> int:
    """Layers of the block container holding the most tensors (the language model in a multimodal model)."""
    roles = [tensor_role(name) for name in names]
    containers = Counter(role.module for role in roles if role.layer is not None)
    if not containers:
        return 0
    main = containers.most_common(1)[0][0]
    return 1 + max(role.layer for role in roles if role.module == main and role.layer is not None)


def tensor_record_header(name: str, tensor: torch.Tensor) -> bytes:
    """The per-tensor prefix hashed before the bytes: name, safetensors dtype code and shape."""
    code = TORCH_TO_SAFETENSORS.get(tensor.dtype, str(tensor.dtype))
    return f"{name}\0{code}\0{list(tensor.shape)}\0".encode()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def describe_tokenizer(directory: Path) -> dict | None:
    """Canonical description of a tokenizer: {"vocab": [[token, id]...], "added": [...], "special": {...}}.

    Read from tokenizer.json when present (no code runs); otherwise from `AutoTokenizer` with
    `trust_remote_code=False`. None when the directory has no tokenizer files.
    """
    if (directory / "tokenizer.json").is_file():
        vocab, added = _vocab_from_tokenizer_json(directory / "tokenizer.json")
    elif any((directory / name).is_file() for name in TOKENIZER_FILES):
        vocab, added = _vocab_from_auto_tokenizer(directory)
    else:
        return None
    special: dict[str, object] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json_or_empty(directory / name)
        for key in SPECIAL_TOKEN_KEYS:
            if key in data and data[key] is not None:
                special.setdefault(key, _token_content(data[key]))
    return {"vocab": sorted(vocab.items()), "added": sorted(added), "special": special}


def _token_content(value: object) -> object:
    """Special tokens are stored as strings or AddedToken dicts; keep only their text."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(item) for item in value]
    return value


def _vocab_from_tokenizer_json(file: Path) -> tuple[dict[str, int], list[list]]:
    data = _read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ModelError(f"{file} has no 'model' section.")
    raw_vocab = model.get("vocab")
    if isinstance(raw_vocab, dict):  # BPE, WordPiece, WordLevel
        vocab = {str(token): int(index) for token, index in raw_vocab.items()}
    elif isinstance(raw_vocab, list):  # Unigram: [[token, score], ...], the id is the position
        vocab = {str(entry[0]): index for index, entry in enumerate(raw_vocab)}
    else:
        raise ModelError(f"{file} has a tokenizer model without a vocabulary.")
    added = []
    for token in data.get("added_tokens") or []:
        vocab[str(token["content"])] = int(token["id"])
        added.append([int(token["id"]), str(token["content"]), bool(token.get("special", False))])
    return vocab, added


def _vocab_from_auto_tokenizer(directory: Path) -> tuple[dict[str, int], list[list]]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, ImportError, ... for bad tokenizers
        raise ModelError(f"Cannot load the tokenizer in {directory}: {error}".split("\n")[0] + ".") from error
    added = [
        [int(index), str(token.content), bool(token.special)]
        for index, token in tokenizer.added_tokens_decoder.items()
    ]
    return dict(tokenizer.get_vocab()), added
