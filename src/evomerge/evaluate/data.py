"""Reading a task's rows: local JSONL / CSV / Parquet files and locally cached `datasets` datasets."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from evomerge.errors import TaskError
from evomerge.evaluate.offline import datasets_offline

Row = dict[str, Any]


class CachedDatasetSpec(Protocol):
    """What `load_cached_dataset` reads of a task's `data: {dataset: ...}` block."""

    dataset: str
    config: str | None
    search_split: str
    test_split: str


def read_rows(path: Path, task_file: Path) -> list[Row]:
    """Rows of a local JSONL / JSON / CSV / Parquet file, chosen by extension."""
    if not path.is_file():
        raise TaskError(f"task file {task_file}: data file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            return read_jsonl(path)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return [dict(row) for row in csv.DictReader(handle)]
    except UnicodeDecodeError as error:
        raise TaskError(f"data file {path} is not UTF-8 text (byte {error.start} cannot be decoded)") from None
    if suffix == ".parquet":
        try:
            import pyarrow
            from pyarrow import parquet
        except ImportError:
            raise TaskError(f"data file {path} is Parquet; install evomerge[parquet] to read it") from None
        try:
            return parquet.read_table(path).to_pylist()
        except (pyarrow.ArrowException, OSError, ValueError) as error:
            raise TaskError(f"data file {path} is not a readable Parquet file ({error})") from None
    raise TaskError(f"task file {task_file}: data file {path} must be .jsonl, .csv or .parquet")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TaskError(f"data file {path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise TaskError(f"data file {path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def load_cached_dataset(spec: CachedDatasetSpec, task_file: Path) -> tuple[dict[str, list[Row]], str]:
    """Load a `datasets` dataset strictly offline; return the rows per split and a content fingerprint."""
    try:
        datasets_offline()
    except ImportError:
        raise TaskError(
            f"task file {task_file}: data.dataset needs the `datasets` package installed"
        ) from None
    import datasets
    splits: dict[str, list[Row]] = {}
    digest = hashlib.sha256()
    for split, name in (("search", spec.search_split), ("test", spec.test_split)):
        try:
            loaded = datasets.load_dataset(spec.dataset, spec.config, split=name)
        except Exception as error:  # noqa: BLE001 -- datasets raises many unrelated types, all "not usable offline"
            reason = " ".join(str(error).split())[:200]
            raise TaskError(
                f"task file {task_file}: dataset {spec.dataset!r} split {name!r} is not available in the "
                f"local cache (downloads are disabled; HF_DATASETS_OFFLINE=1): {reason}"
            ) from None
        splits[split] = [dict(row) for row in loaded]
        digest.update(f"{split}:{getattr(loaded, '_fingerprint', '')}".encode())
    return splits, digest.hexdigest()


__all__ = ["Row", "load_cached_dataset", "read_jsonl", "read_rows"]
