"""Result cache: task scores keyed by (model fingerprint, task fingerprint, split, example indices).

Kept outside the `Evaluator` on purpose: the evaluator must never remember anything derived from
weights (the search rewrites them in place), while a cache keyed by the model's *content* hash is safe.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import TaskError
from evomerge.evaluate.engine import TaskScore


def cache_key(model_fingerprint: str, task_fingerprint: str, split: str, indices: Sequence[int]) -> str:
    """A stable string key for one (model, task, split, example subset)."""
    payload = json.dumps([model_fingerprint, task_fingerprint, split, list(indices)])
    return hashlib.sha256(payload.encode()).hexdigest()


class ResultCache:
    """An in-memory dict of `TaskScore`s, optionally persisted to a JSON file (rewritten atomically)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, TaskScore] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                self._entries = {key: TaskScore.from_dict(value) for key, value in raw.items()}
            except (json.JSONDecodeError, TypeError, AttributeError):
                raise TaskError(f"result cache {self.path} is not a valid cache file; delete it") from None

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, model_fingerprint: str, task_fingerprint: str, split: str, indices: Sequence[int]
    ) -> TaskScore | None:
        """The cached score, or None."""
        return self._entries.get(cache_key(model_fingerprint, task_fingerprint, split, indices))

    def put(
        self,
        model_fingerprint: str,
        task_fingerprint: str,
        split: str,
        indices: Sequence[int],
        score: TaskScore,
    ) -> None:
        """Store a score (and persist the file, if any)."""
        self._entries[cache_key(model_fingerprint, task_fingerprint, split, indices)] = score
        if self.path is not None:
            self._save()

    def _save(self) -> None:
        assert self.path is not None
        data = {key: score.to_dict() for key, score in self._entries.items()}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        # Atomic replace: a crash mid-write never leaves a truncated cache behind.
        os.replace(tmp, self.path)


__all__ = ["ResultCache", "cache_key"]
