"""Where a checkpoint's tensors come from: validated safetensors files (memory-mapped) or pickles.

Every safetensors header is validated against its file's size when the source is opened, so corrupt or
truncated downloads fail before a merge starts. Pickle weights are refused unless the caller opts in,
because unpickling can run arbitrary code; when allowed they are loaded with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from pathlib import Path, PurePosixPath
from typing import Protocol

import torch

from evomerge.errors import ModelError
from evomerge.models.safetensors_header import TensorInfo, read_header

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


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
    weight_map = read_weight_map(index_file)
    tensors: dict[str, TensorInfo] = {}
    headers: dict[Path, bytes] = {}
    for shard_name in sorted(set(weight_map.values())):
        shard = index_file.parent / shard_name
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


def read_weight_map(index_file: Path) -> dict[str, str]:
    """An index's tensor -> shard map, every shard an existing file inside the model directory.

    Shard names are checked as written, not resolved: a Hugging Face cache snapshot links its files to
    blobs elsewhere, but a name with `..` or an absolute path would make a model read any file on disk.
    """
    index = read_json(index_file)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{index_file} has no 'weight_map' object.")
    for name, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or not shard_name:
            raise ModelError(f"{index_file}: weight_map entry {name!r} must be a shard file name, got {shard_name!r}.")
        relative = PurePosixPath(shard_name.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelError(
                f"{index_file}: weight_map entry {name!r} names shard {shard_name!r} outside the model directory."
            )
    for shard_name in sorted(set(weight_map.values())):
        if not (index_file.parent / shard_name).is_file():
            raise ModelError(f"{index_file} refers to shard {shard_name!r}, which does not exist.")
    return weight_map


def _pickle_files(path: Path) -> list[Path]:
    """Pickle weight files of a directory, from an index when present."""
    if (path / PICKLE_INDEX).is_file():
        return [path / name for name in sorted(set(read_weight_map(path / PICKLE_INDEX).values()))]
    if (path / PICKLE_SINGLE).is_file():
        return [path / PICKLE_SINGLE]
    return sorted(path.glob("*.pt")) + sorted(p for p in path.glob("*.bin") if p.name != "training_args.bin")


def read_json(file: Path) -> object:
    """Parse a JSON file; raise `ModelError` naming it when it cannot be read or parsed."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{file} is not valid JSON: {error}.") from error
    except OSError as error:
        raise ModelError(f"Cannot read {file}: {error.strerror or error}.") from error


def read_json_or_empty(file: Path) -> dict:
    """A JSON object file, or {} when it is missing or holds something else."""
    if not file.is_file():
        return {}
    data = read_json(file)
    return data if isinstance(data, dict) else {}
