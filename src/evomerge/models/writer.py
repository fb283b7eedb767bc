"""`CheckpointWriter`: stream tensors into sharded safetensors files, atomically.

Everything is written into a hidden sibling directory `.<name>.tmp-<pid>` and renamed into place only
when complete, so a crash, Ctrl-C or full disk never leaves a half-written model where a user (or the
next pipeline stage) would take it for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from evomerge.errors import ExportError
from evomerge.models.checkpoint import tensor_bytes
from evomerge.models.safetensors_header import TORCH_TO_SAFETENSORS
from evomerge.models.sources import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from evomerge.models.tokenizer import TOKENIZER_FILES

if TYPE_CHECKING:  # typing.Self needs Python 3.11; we support 3.10
    from typing_extensions import Self

DONOR_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)


class CheckpointWriter:
    """Context manager writing a Hugging Face model directory.

    `add(name, tensor)` buffers tensors (copied to CPU) until the current shard would exceed
    `max_shard_bytes`, then writes it; a tensor larger than the limit gets a shard of its own. On a clean
    exit the shards are named `model-0000i-of-0000N.safetensors` (or one `model.safetensors`), the index
    is written, and the directory is renamed to `out_dir`. An existing non-empty `out_dir` is refused
    unless `overwrite=True`, in which case it is replaced only after the new one is complete. On any
    exception (KeyboardInterrupt included) the temporary directory is deleted; OS errors such as ENOSPC
    surface as `ExportError`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        max_shard_bytes: int = 2_000_000_000,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise ExportError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
        self.out_dir = Path(out_dir).absolute()
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.overwrite = overwrite
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # (temporary file, tensor names)
        self._names: set[str] = set()
        self._total_bytes = 0
        self._open = False
        # One shard is written on a background thread while the next one fills, so disk writes overlap
        # with the caller's merging; at most two shards are in memory.
        self._shard_writer: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    # --- context manager ----------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._refuse_existing()
        try:
            if self.tmp_dir.exists():  # left by a killed process that had our pid
                shutil.rmtree(self.tmp_dir)
            self.tmp_dir.mkdir(parents=True)
        except OSError as error:
            raise _export_error(self.out_dir, error) from error
        self._shard_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-shard")
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self._open = False
        if exc is not None:
            self._discard()
            if isinstance(exc, OSError):
                raise _export_error(self.out_dir, exc) from exc
            return False
        try:
            self._finish_shards()
            self._move_into_place()
        except OSError as error:
            self._discard()
            raise _export_error(self.out_dir, error) from error
        except BaseException:
            self._discard()
            raise
        self._stop_shard_writer()
        return False

    def _discard(self) -> None:
        """Abandon the write: the shard thread first (it may still be writing into it), then the temp dir."""
        self._stop_shard_writer()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _stop_shard_writer(self) -> None:
        """Wait for the shard being written (its errors no longer matter) and end the thread."""
        if self._shard_writer is not None:
            self._shard_writer.shutdown(wait=True)
            self._shard_writer = None
        self._in_flight = None

    def _wait_for_shard(self) -> None:
        """Block until the shard in flight is on disk; its OSError surfaces here."""
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            try:
                in_flight.result()
            except OSError as error:
                raise _export_error(self.out_dir, error) from error

    # --- writing ------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor, *, copy: bool = True) -> None:
        """Queue one tensor for writing.

        It is copied to the CPU now, so the caller may reuse or free its buffer; a caller handing over a
        fresh CPU tensor it will not touch again passes `copy=False` to save that copy.
        """
        self._require_open()
        if name in self._names:
            raise ExportError(f"Tensor {name!r} was added twice to {self.out_dir}.")
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ExportError(f"Tensor {name!r} has dtype {tensor.dtype}, which safetensors cannot store.")
        stored = tensor.detach().to("cpu", copy=copy).contiguous()
        nbytes = stored.numel() * stored.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending.append((name, stored))
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def copy_files(
        self, donor_dir: str | Path, names: list[str] | tuple[str, ...] | None = None
    ) -> list[str]:
        """Copy config/generation/tokenizer files from `donor_dir`; returns the names copied.

        With `names=None`, every file of `DONOR_FILES` that exists is copied; explicitly named files must
        exist (an `ExportError` names the missing one).
        """
        self._require_open()
        donor = Path(donor_dir)
        wanted = DONOR_FILES if names is None else tuple(names)
        copied = []
        for name in wanted:
            source = donor / name
            if not source.is_file():
                if names is None:
                    continue
                raise ExportError(f"Donor file {source} does not exist.")
            target = self._inside(name)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as error:
                raise _export_error(self.out_dir, error) from error
            copied.append(name)
        return copied

    def write_text(self, relpath: str | Path, text: str) -> Path:
        """Write a UTF-8 text file inside the output directory; paths escaping it raise `ExportError`."""
        self._require_open()
        target = self._inside(relpath)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        except OSError as error:
            raise _export_error(self.out_dir, error) from error
        return self.out_dir / target.relative_to(self.tmp_dir)

    # --- internals ----------------------------------------------------------------------------
    def _inside(self, relpath: str | Path) -> Path:
        """Resolve `relpath` under the temporary directory, refusing absolute paths and `..` escapes."""
        relative = Path(relpath)
        root = self.tmp_dir.resolve()
        target = (root / relative).resolve()
        if relative.is_absolute() or target == root or not target.is_relative_to(root):
            raise ExportError(f"Path {str(relpath)!r} escapes the output directory {self.out_dir}.")
        return target

    def _require_open(self) -> None:
        if not self._open:
            raise ExportError(f"The writer for {self.out_dir} is not open; use it as a `with` block.")

    def _refuse_existing(self) -> None:
        occupied = self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir()))
        if occupied and not self.overwrite:
            raise ExportError(f"Output directory {self.out_dir} already exists and is not empty.")

    def _flush(self) -> None:
        """Write the pending tensors as the next shard under a temporary name."""
        if not self._pending:
            return
        file = self.tmp_dir / f"shard-{len(self._shards) + 1:05d}.partial"
        self._wait_for_shard()
        assert self._shard_writer is not None
        self._in_flight = self._shard_writer.submit(write_safetensors, file, self._pending, self.metadata)
        self._shards.append((file, [name for name, _ in self._pending]))
        self._pending = []
        self._pending_bytes = 0

    def _finish_shards(self) -> None:
        """Give shards their final names (the total is known only now) and write the index."""
        self._flush()
        self._wait_for_shard()
        if not self._shards:
            raise ExportError(f"No tensors were added to {self.out_dir}.")
        if len(self._shards) == 1:
            self._shards[0][0].rename(self.tmp_dir / SAFETENSORS_SINGLE)
            return
        total = len(self._shards)
        weight_map = {}
        for number, (file, names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{total:05d}.safetensors"
            file.rename(self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {
            "metadata": {"total_size": self._total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.tmp_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _move_into_place(self) -> None:
        self._refuse_existing()  # something may have appeared while we were writing
        if self.out_dir.is_dir() and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()
        if self.out_dir.exists():  # overwrite=True: swap, then drop the old model
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
            self.tmp_dir.rename(self.out_dir)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            self.tmp_dir.rename(self.out_dir)


def write_safetensors(file: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write contiguous CPU tensors as one safetensors file, tensor by tensor.

    Our own few lines instead of `safetensors.torch.save_file` so that OS errors (ENOSPC, EFBIG) reach us
    as `OSError` with their errno rather than as an opaque library error.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": TORCH_TO_SAFETENSORS[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data buffer to 8 bytes with spaces
    with file.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for _, tensor in tensors:
            handle.write(tensor_bytes(tensor))


def _export_error(out_dir: Path, error: OSError) -> ExportError:
    reason = error.strerror or str(error)
    return ExportError(f"Could not write the model to {out_dir}: {reason}.")
