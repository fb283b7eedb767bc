"""Read and validate safetensors headers without touching tensor data.

A safetensors file is `u64 little-endian header length | JSON header | data buffer`. The JSON maps each
tensor name to `{dtype, shape, data_offsets: [begin, end]}` relative to the data buffer. Validating the
header against the file size at open time turns a truncated download or a lying header into a
`ModelError` before a merge has spent minutes on the other tensors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import ModelError

# safetensors dtype code -> (torch dtype, bytes per element). Sub-byte float formats are left out on
# purpose: torch cannot hold them as ordinary tensors, so they are refused by name.
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {dt: code for code, (dt, _) in SAFETENSORS_DTYPES.items()}

# A header larger than this is not a real checkpoint (the Rust reader uses the same 100 MB bound).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, as promised by a validated header."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # absolute byte offset of the tensor's data in `file`


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one file: tensors, free-form metadata and the raw header bytes."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    raw: bytes


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header of `path` against the file's size; raise `ModelError` naming it.

    Checks: the header length fits in the file, the JSON parses, every dtype is known, every
    `end - begin` equals `prod(shape) * itemsize`, and the tensors tile the data buffer exactly
    (no gaps, no overlaps, nothing past the end, nothing left over) — the layout the safetensors
    reader itself insists on, so a file passing here will not fail later on `safe_open`.
    """
    try:
        file_size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path} is not a safetensors file: it is only {file_size} bytes long.")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise ModelError(
                    f"{path} is truncated or corrupt: its header claims {header_len} bytes "
                    f"but the file has {file_size}."
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise ModelError(f"Cannot read {path}: {error.strerror or error}.") from error
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{path} is corrupt: its safetensors header is not valid JSON ({error}).") from error
    if not isinstance(header, dict):
        raise ModelError(f"{path} is corrupt: its safetensors header is not a JSON object.")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    # The format defines metadata as a string -> string map; anything else is a damaged or forged file.
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ModelError(f"{path} is corrupt: its safetensors __metadata__ is not an object of strings.")
    data_size = file_size - 8 - header_len
    tensors = {name: _parse_entry(path, name, entry, 8 + header_len) for name, entry in header.items()}
    _check_tiling(path, header, data_size)
    return SafetensorsHeader(tensors=tensors, metadata=dict(metadata), raw=raw)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """Validate one header entry's dtype, shape and byte span."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ModelError(f"{path} is corrupt: header entry for tensor {name!r} is malformed.")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {code!r}.")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ModelError(f"{path} is corrupt: tensor {name!r} has invalid shape {shape!r}.")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and o >= 0 for o in offsets)
    ):
        raise ModelError(f"{path} is corrupt: tensor {name!r} has invalid data offsets {offsets!r}.")
    dtype, itemsize = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ModelError(
            f"{path} is corrupt: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but its "
            f"shape {shape} of {code} needs {nbytes}."
        )
    return TensorInfo(file=path, dtype=dtype, shape=tuple(shape), nbytes=nbytes, offset=data_start + offsets[0])


def _check_tiling(path: Path, header: dict, data_size: int) -> None:
    """Require the tensors' byte spans to cover the data buffer exactly, in some order."""
    spans = sorted(
        (entry["data_offsets"][0], entry["data_offsets"][1], name) for name, entry in header.items()
    )
    position = 0
    for begin, end, name in spans:
        if begin != position:
            raise ModelError(
                f"{path} is corrupt: tensor {name!r} starts at byte {begin} of the data, expected {position}."
            )
        position = end
    if position > data_size:
        raise ModelError(
            f"{path} is truncated: its header needs {position} data bytes but only {data_size} are present."
        )
    if position < data_size:
        raise ModelError(
            f"{path} is corrupt: {data_size - position} bytes after the last tensor are not described "
            "by its header."
        )
