"""Compatibility of parent models, checked before any tensor is merged.

Merging fails late and confusingly when parents differ in tensor names, shapes or tokenizers (a
vocabulary mismatch shows up as a shape error in the last tensor, or worse, as silently scrambled
embedding rows). `check_compatible` reads headers and tokenizer files only, so it costs milliseconds and
says in one sentence what differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import CompatibilityError
from evomerge.models.checkpoint import Checkpoint, count_layers
from evomerge.models.roles import tensor_role

MAX_LISTED = 5


@dataclass(frozen=True)
class RowAlignment:
    """A vocabulary tensor of `model` whose `rows` must become `target_rows` (see `align_rows`)."""

    tensor: str  # name in the reference (base/first) model's namespace
    model: Path
    rows: int
    target_rows: int


@dataclass(frozen=True)
class CompatReport:
    """Outcome of `check_compatible` for parents that *can* be merged.

    `tokenizer_donor` is the directory whose tokenizer files the merged model uses (the `tokenizer_source`
    when given, else the base, else the first listed model); `config_donor` the one whose config.json /
    generation_config.json it uses: the same model, because those files carry the special-token ids
    (bos/eos/pad) that must agree with the tokenizer shipped beside them. `config_updates` lists config
    fields the writer must change (e.g. `vocab_size` when the donor's config disagrees with its rows). Models are keyed
    by their directory in `tokenizer_fingerprints`, in the order base, then the listed models.
    """

    architecture: str | None
    model_type: str | None
    num_layers: int
    tensor_names: tuple[str, ...]
    tokenizer_fingerprints: dict[str, str | None]
    config_donor: Path
    tokenizer_donor: Path
    row_alignments: tuple[RowAlignment, ...]
    config_updates: dict[str, int]
    notes: tuple[str, ...]
    verdict: str
    vocabulary_tensors: tuple[str, ...] = ()  # embedding / LM-head tensors (rows = tokens), reference names


def check_compatible(
    checkpoints: Sequence[Checkpoint],
    *,
    base: Checkpoint | None = None,
    tokenizer_source: Checkpoint | None = None,
    prefix_map: Mapping[str, str] | None = None,
    union: bool = False,
) -> CompatReport:
    """Check that `checkpoints` (and `base`) can be merged tensor by tensor; raise `CompatibilityError`.

    Requirements: the same tensor names (up to five missing/extra names per model are listed), the same
    shapes, and the same tokenizer fingerprint — unless `tokenizer_source` (one of the parents) is given.

    Vocabulary rule with `tokenizer_source`: an embedding or LM-head tensor whose row count R (its
    model's `vocab_size`) differs from the tokenizer source's row count T is aligned *by token id*: rows
    `0..min(R, T)-1` are kept, rows from T on are dropped when R > T, and when R < T the missing rows
    `R..T-1` are copied from the tokenizer source's own tensor (a zero task vector there, so those
    tokens keep the source's embedding). Aligning by id is only meaningful when the tokenizers agree on
    the ids they share, so a token id mapped to different tokens is refused. `align_rows` applies it.

    `union` (mergekit's `tokenizer_source: union`) allows any vocabularies: the caller re-indexes every
    vocabulary tensor to the union of the tokens (`merge.union`), so rows and tokenizers are not compared.

    `prefix_map` maps a name prefix of the reference model (base, else first) to a prefix in the other
    parents, e.g. `{"language_model.": ""}` to merge a Llava model's language tower with plain Llama
    models; only the reference tensors under the mapped prefixes are then checked (and merged).
    """
    parents = _ordered_parents(checkpoints, base)
    reference = parents[0]
    if tokenizer_source is not None and not any(tokenizer_source is p for p in parents):
        raise CompatibilityError(
            f"The tokenizer source {tokenizer_source.path} must be one of the merged models."
        )
    names = _reference_names(reference, prefix_map)
    notes: list[str] = []
    for other in parents[1:]:
        _check_names(reference, other, names, prefix_map)
    target_rows, vocab_tensors = _vocabulary_rows(reference, names, tokenizer_source, prefix_map)
    alignments = []
    for other in parents[1:]:
        alignments += _check_shapes(
            reference, other, names, prefix_map, vocab_tensors, None if union else target_rows,
            reference if union else tokenizer_source,
        )
        if other.architecture != reference.architecture:
            notes.append(f"{other.path} is a {other.architecture}, the reference a {reference.architecture}.")
    dtypes = {p.dtype(n if p is reference else _map_name(n, prefix_map)) for p in parents for n in names}
    if len(dtypes) > 1:
        notes.append(f"parents store different dtypes ({', '.join(sorted(map(str, dtypes)))}).")
    fingerprints = {str(p.path): p.tokenizer_fingerprint() for p in parents}
    if not union:
        _check_tokenizers(parents, fingerprints, tokenizer_source, target_rows)
    tokenizer_donor = tokenizer_source or reference
    config_updates = {}
    if target_rows is not None and tokenizer_source is not None and _config_vocab(tokenizer_donor) != target_rows:
        config_updates["vocab_size"] = target_rows
    verdict = _verdict(parents, names, tokenizer_source, alignments)
    if union:
        verdict = verdict.replace(", one tokenizer", ", the union of their vocabularies")
    return CompatReport(
        architecture=reference.architecture,
        model_type=reference.model_type,
        num_layers=count_layers(names) if prefix_map else reference.num_layers,
        tensor_names=tuple(names),
        tokenizer_fingerprints=fingerprints,
        config_donor=tokenizer_donor.config_dir,
        tokenizer_donor=tokenizer_donor.tokenizer_dir,
        row_alignments=tuple(alignments),
        config_updates=config_updates,
        notes=tuple(notes),
        verdict=verdict,
        vocabulary_tensors=tuple(sorted(vocab_tensors)),
    )


def align_rows(tensor: torch.Tensor, target_rows: int, filler: torch.Tensor) -> torch.Tensor:
    """Apply the vocabulary rule of `check_compatible`: keep rows `0..min(R, T)-1` of `tensor`, and take
    rows `R..T-1` from `filler` (the tokenizer source's tensor, which has `T` rows)."""
    rows = tensor.shape[0]
    if rows >= target_rows:
        return tensor[:target_rows]
    return torch.cat([tensor, filler[rows:target_rows].to(tensor.dtype)], dim=0)


# --- helpers ----------------------------------------------------------------------------------
def _ordered_parents(checkpoints: Sequence[Checkpoint], base: Checkpoint | None) -> list[Checkpoint]:
    """Base first (it is the reference and config donor), then the listed models without repeats."""
    parents: list[Checkpoint] = [base] if base is not None else []
    for checkpoint in checkpoints:
        if not any(checkpoint is p for p in parents):
            parents.append(checkpoint)
    if not parents:
        raise CompatibilityError("No models were given to merge.")
    return parents


def _map_name(name: str, prefix_map: Mapping[str, str] | None) -> str:
    """Reference-namespace name -> the other parents' name (longest matching prefix wins)."""
    if not prefix_map:
        return name
    key = max((k for k in prefix_map if name.startswith(k)), key=len)
    return prefix_map[key] + name[len(key) :]


def _reference_names(reference: Checkpoint, prefix_map: Mapping[str, str] | None) -> list[str]:
    names = reference.tensor_names()
    if not prefix_map:
        return names
    selected = [n for n in names if any(n.startswith(k) for k in prefix_map)]
    if not selected:
        raise CompatibilityError(
            f"No tensor of {reference.path} starts with a prefix of {sorted(prefix_map)}."
        )
    return selected


def _check_names(
    reference: Checkpoint, other: Checkpoint, names: list[str], prefix_map: Mapping[str, str] | None
) -> None:
    expected = {_map_name(n, prefix_map) for n in names}
    values = tuple(prefix_map.values()) if prefix_map else ("",)
    present = {n for n in other.tensor_names() if n.startswith(values)}
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(
                f"lacks {len(missing)} tensor(s) of {reference.path} ({', '.join(missing[:MAX_LISTED])})"
            )
        if extra:
            parts.append(f"has {len(extra)} extra tensor(s) ({', '.join(extra[:MAX_LISTED])})")
        raise CompatibilityError(f"{other.path} {' and '.join(parts)}.")


def _config_vocab(checkpoint: Checkpoint) -> int | None:
    for config in (checkpoint.config, checkpoint.config.get("text_config") or {}):
        if isinstance(config.get("vocab_size"), int):
            return config["vocab_size"]
    return None


def _is_vocab_tensor(checkpoint: Checkpoint, name: str) -> bool:
    """Embedding/head tensors indexed by token id: their row count is the model's vocabulary size."""
    if tensor_role(name, checkpoint.model_type).kind not in ("embedding", "head"):
        return False
    vocab = _config_vocab(checkpoint)
    shape = checkpoint.shape(name)
    return bool(shape) and (vocab is None or shape[0] == vocab)


def _vocabulary_rows(
    reference: Checkpoint,
    names: list[str],
    tokenizer_source: Checkpoint | None,
    prefix_map: Mapping[str, str] | None,
) -> tuple[int | None, set[str]]:
    """Target row count (the tokenizer source's, else the reference's) and the vocabulary tensors."""
    vocab_tensors = {n for n in names if _is_vocab_tensor(reference, n)}
    if not vocab_tensors:
        return None, vocab_tensors
    first = min(vocab_tensors)
    if tokenizer_source is None or tokenizer_source is reference:
        return reference.shape(first)[0], vocab_tensors
    return tokenizer_source.shape(_map_name(first, prefix_map))[0], vocab_tensors


def _check_shapes(
    reference: Checkpoint,
    other: Checkpoint,
    names: list[str],
    prefix_map: Mapping[str, str] | None,
    vocab_tensors: set[str],
    target_rows: int | None,
    tokenizer_source: Checkpoint | None,
) -> list[RowAlignment]:
    mismatches, alignments = [], []
    for name in names:
        mine, theirs = reference.shape(name), other.shape(_map_name(name, prefix_map))
        if mine == theirs:
            continue
        if (
            name in vocab_tensors
            and mine[1:] == theirs[1:]
            and _is_vocab_tensor(other, _map_name(name, prefix_map))
        ):
            if tokenizer_source is None:
                raise CompatibilityError(
                    f"Tensor {name!r} has {mine[0]} vocabulary rows in {reference.path} but {theirs[0]} in "
                    f"{other.path}; choose a tokenizer source to take or pad rows for one tokenizer."
                )
            continue
        mismatches.append(f"{name} {list(mine)} vs {list(theirs)}")
    if mismatches:
        raise CompatibilityError(
            f"{other.path} differs in shape from {reference.path}: {'; '.join(mismatches[:MAX_LISTED])}."
        )
    if tokenizer_source is not None and target_rows is not None:
        for name in sorted(vocab_tensors):
            for model in (reference, other):
                rows = model.shape(name if model is reference else _map_name(name, prefix_map))[0]
                alignment = RowAlignment(name, model.path, rows, target_rows)
                if rows != target_rows and alignment not in alignments:
                    alignments.append(alignment)
    return alignments


def _check_tokenizers(
    parents: list[Checkpoint],
    fingerprints: dict[str, str | None],
    tokenizer_source: Checkpoint | None,
    target_rows: int | None,
) -> None:
    known = [p for p in parents if fingerprints[str(p.path)] is not None]
    if tokenizer_source is None:
        for other in known[1:]:
            if fingerprints[str(other.path)] != fingerprints[str(known[0].path)]:
                raise CompatibilityError(
                    f"The tokenizers of {known[0].path} and {other.path} differ; choose a tokenizer source."
                )
        return
    source_vocab = tokenizer_source.vocabulary()
    if source_vocab is None:
        raise CompatibilityError(f"The tokenizer source {tokenizer_source.path} has no tokenizer files.")
    by_id = {index: token for token, index in source_vocab.items()}
    for other in known:
        if other is tokenizer_source:
            continue
        for token, index in sorted((other.vocabulary() or {}).items(), key=lambda item: item[1]):
            if target_rows is not None and index >= target_rows:
                break
            if index in by_id and by_id[index] != token:
                raise CompatibilityError(
                    f"Token id {index} is {token!r} in {other.path} but {by_id[index]!r} in the tokenizer "
                    f"source {tokenizer_source.path}, so embedding rows cannot be aligned by id."
                )


def _verdict(
    parents: list[Checkpoint],
    names: list[str],
    tokenizer_source: Checkpoint | None,
    alignments: list[RowAlignment],
) -> str:
    text = f"compatible: {len(parents)} model(s), {len(names)} tensors"
    if tokenizer_source is None:
        return text + ", one tokenizer"
    text += f", tokenizer from {tokenizer_source.path}"
    if alignments:
        text += f", {len(alignments)} vocabulary tensor(s) truncated or padded to {alignments[0].target_rows} rows"
    return text
