"""`tokenizer_source: union` (mergekit's rule): parents with different tokenizers merge over the union of
their tokens, each parent's embedding and LM-head rows re-indexed by token, a token only one parent has
taking that parent's row. Two real zoo-style character tokenizers whose ids disagree."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_llama, read_tensors
from evomerge.errors import CompatibilityError
from evomerge.merge import parse_recipe, run_merge

CHARS_A = "0123456789+="
CHARS_B = "0123456789+=!#"  # '!' and '#' sort before '+': every shared character has another id in B
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("union")
    return (make_llama(root / "a", seed=1, vocab_characters=CHARS_A),
            make_llama(root / "b", seed=2, vocab_characters=CHARS_B))


def recipe(a, b, **extra) -> dict:
    return {"method": "linear", "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                           {"model": str(b), "parameters": {"weight": 0.5}}], **extra}


def test_union_vocabulary_with_aligned_rows(parents, tmp_path):
    a, b = parents
    out = tmp_path / "merged"
    run_merge(parse_recipe(recipe(a, b, tokenizer_source="union")), out)
    vocab_a, vocab_b = AutoTokenizer.from_pretrained(a).get_vocab(), AutoTokenizer.from_pretrained(b).get_vocab()
    merged_vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    # A's tokenizer (the first model's) keeps its ids; B's extra tokens follow in B's id order.
    extra = sorted((t for t in vocab_b if t not in vocab_a), key=vocab_b.get)
    assert extra == ["!", "#"]
    assert merged_vocab == {**vocab_a, **{t: len(vocab_a) + i for i, t in enumerate(extra)}}
    ta, tb, merged = read_tensors(a), read_tensors(b), read_tensors(out)
    for name in VOCAB_TENSORS:
        assert merged[name].shape[0] == len(merged_vocab)
        for token, out_id in merged_vocab.items():
            if token in vocab_a:
                expected = 0.5 * ta[name][vocab_a[token]] + 0.5 * tb[name][vocab_b[token]]
            else:  # only B has it: A's default row is B's own, so the merge keeps B's row
                expected = tb[name][vocab_b[token]]
            torch.testing.assert_close(merged[name][out_id], expected)
    for name in set(merged) - set(VOCAB_TENSORS):
        torch.testing.assert_close(merged[name], 0.5 * ta[name] + 0.5 * tb[name])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(merged_vocab)
    ids = AutoTokenizer.from_pretrained(out)("1#2", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(merged_vocab)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["tokenizer_source"] == "union"


def test_without_union_different_tokenizers_are_refused(parents, tmp_path):
    with pytest.raises(CompatibilityError):
        run_merge(parse_recipe(recipe(*parents)), tmp_path / "refused")
