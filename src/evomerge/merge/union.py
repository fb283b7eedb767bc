"""`tokenizer_source: union`: merge parents whose vocabularies differ, over the union of their tokens.

The rules are mergekit's (read from its documentation and behaviour, not its code):
- The output tokenizer is the base model's (else the first model's) with every token the other parents
  have and it lacks appended as added tokens, in parent order and, within a parent, in id order (its
  special tokens last, with their settings).
- Every vocabulary tensor (embeddings, LM head) of every parent is re-indexed to the output ids: a
  parent's own row where it has the token; where it lacks it, a default row: the row of the only parent
  that has the token, else the base model's row when the base has it, else the mean of the rows of the
  parents that have it. A parent lacking a token thus adds no task vector for it (its default is the
  base's row) and the merged row is the parents' consensus.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import CompatibilityError
from evomerge.models import Checkpoint

UNION = "union"
# Files `save_pretrained` writes for a fast tokenizer; they replace the donor's copies in the output.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class UnionVocabulary:
    """The output tokenizer's files and, per parent directory, the parent's row for every output id (-1: none)."""

    size: int
    rows: Mapping[Path, torch.Tensor]
    base: Path
    files: Mapping[str, str]

    def align(self, tensors: Mapping[Path, torch.Tensor]) -> dict[Path, torch.Tensor]:
        """Each parent's vocabulary tensor re-indexed to the output ids (rows it lacks get the default)."""
        first = next(iter(tensors.values()))
        default = first.new_zeros((self.size, *first.shape[1:]))
        count = first.new_zeros(self.size)
        # A parent's id beyond its tensor's rows (a tokenizer larger than the embedding) counts as absent.
        present = {path: (self.rows[path] >= 0) & (self.rows[path] < tensor.shape[0]) for path, tensor in tensors.items()}
        for path, tensor in tensors.items():
            have = present[path]
            default[have] += tensor[self.rows[path][have]]
            count[have] += 1
        default /= count.clamp(min=1).view(-1, *([1] * (first.dim() - 1)))
        if self.base in tensors:
            # The base's own row wins over the mean where the base has the token (a lone owner's row is
            # already the mean of one).
            have = present[self.base]
            default[have] = tensors[self.base][self.rows[self.base][have]]
        aligned = {}
        for path, tensor in tensors.items():
            out = default.clone()
            have = present[path]
            out[have] = tensor[self.rows[path][have]]
            aligned[path] = out
        return aligned


def _vocabulary(checkpoint: Checkpoint) -> dict[str, int]:
    vocabulary = checkpoint.vocabulary()
    if vocabulary is None:
        raise CompatibilityError(f"{checkpoint.path} has no tokenizer files, so `tokenizer_source: union` cannot use it")
    return vocabulary


def union_vocabulary(parents: Sequence[Checkpoint]) -> UnionVocabulary:
    """The union tokenizer of `parents` (the one whose tokenizer is extended first) and the row maps."""
    from transformers import AutoTokenizer

    base = parents[0]
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir, use_fast=True)
    known = set(tokenizer.get_vocab())
    for other in parents[1:]:
        theirs = AutoTokenizer.from_pretrained(other.tokenizer_dir, use_fast=True)
        special = {token.content: token for token in theirs.added_tokens_decoder.values()}
        regular = sorted((i, t) for t, i in _vocabulary(other).items() if t not in known and t not in special)
        tokenizer.add_tokens([t for _, t in regular])
        extra = [token for content, token in special.items() if content not in known]
        tokenizer.add_tokens(extra)
        known |= {t for _, t in regular} | {token.content for token in extra}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        files = {name: (Path(scratch) / name).read_text(encoding="utf-8")
                 for name in TOKENIZER_FILES if (Path(scratch) / name).is_file()}
    union = tokenizer.get_vocab()
    size = max(union.values()) + 1
    rows = {}
    for parent in parents:
        own = _vocabulary(parent)
        index = torch.full((size,), -1, dtype=torch.long)
        for token, out_id in union.items():
            if token in own:
                index[out_id] = own[token]
        rows[parent.path] = index
    return UnionVocabulary(size, rows, base.path, files)
