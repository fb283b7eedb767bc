"""The tokenizer as model identity sees it: vocabulary, added and special tokens, read without running code."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ModelError
from evomerge.models.sources import read_json, read_json_or_empty

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
        data = read_json_or_empty(directory / name)
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
    data = read_json(file)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ModelError(f"{file} has no 'model' section.")
    raw_vocab = model.get("vocab")
    if isinstance(raw_vocab, dict):  # BPE, WordPiece, WordLevel
        vocab = {token: _token_id(file, f"vocabulary entry {token!r}", index) for token, index in raw_vocab.items()}
    elif isinstance(raw_vocab, list):  # Unigram: [[token, score], ...], the id is the position
        if not all(isinstance(entry, list) and entry and isinstance(entry[0], str) for entry in raw_vocab):
            raise ModelError(f"{file}: every Unigram vocabulary entry must be a [token, score] pair.")
        vocab = {entry[0]: index for index, entry in enumerate(raw_vocab)}
    else:
        raise ModelError(f"{file} has a tokenizer model without a vocabulary.")
    added = []
    tokens = data.get("added_tokens") or []
    for position, token in enumerate(tokens if isinstance(tokens, list) else [tokens]):
        content = token.get("content") if isinstance(token, dict) else None
        if not isinstance(content, str):
            raise ModelError(f"{file}: added_tokens[{position}] has no string 'content'.")
        index = _token_id(file, f"added_tokens[{position}]", token.get("id"))
        vocab[content] = index
        added.append([index, content, bool(token.get("special", False))])
    return vocab, added


def _token_id(file: Path, what: str, value: object) -> int:
    """A token id as the file states it: a non-negative JSON integer, nothing converted."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelError(f"{file}: {what} has id {value!r}, which is not a non-negative integer.")
    return value


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
