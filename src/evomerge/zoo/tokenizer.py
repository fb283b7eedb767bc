"""A real character-level `PreTrainedTokenizerFast` for the tiny zoo (one token per character)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def build_char_tokenizer(characters: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build a tokenizer whose vocabulary is the special tokens followed by the sorted unique characters.

    Splitting every character into its own token keeps arithmetic and string skills learnable by a
    model with a few hundred thousand parameters; ids are stable for a given character set.
    """
    alphabet = sorted(set("".join(characters)))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )
    return tokenizer
