"""check_compatible on real tiny checkpoints: names, shapes, tokenizers, vocabulary rows, sub-module maps."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TEST_CHARACTERS
from evomerge.errors import CompatibilityError
from evomerge.models import Checkpoint, align_rows, check_compatible
from evomerge.models.compat import RowAlignment

# Characters sorting after every test character: appending them adds ids at the end of the vocabulary.
TAIL = "{|}"


def test_compatible_parents_get_a_report_with_a_deterministic_donor(tiny_llama):
    first, second, base = (Checkpoint.open(tiny_llama(seed)) for seed in (0, 1, 2))
    report = check_compatible([first, second])
    assert (report.architecture, report.model_type, report.num_layers) == ("LlamaForCausalLM", "llama", 4)
    assert report.config_donor == first.path and report.tokenizer_donor == first.path
    assert len(set(report.tokenizer_fingerprints.values())) == 1
    assert list(report.tokenizer_fingerprints) == [str(first.path), str(second.path)]
    assert report.tensor_names == tuple(first.tensor_names())
    assert report.row_alignments == () and report.config_updates == {}
    assert report.verdict == "compatible: 2 model(s), 39 tensors, one tokenizer"
    with_base = check_compatible([first, second], base=base)
    assert with_base.config_donor == base.path
    assert next(iter(with_base.tokenizer_fingerprints)) == str(base.path)


def test_missing_tensors_are_named(tiny_llama):
    untied, tied = Checkpoint.open(tiny_llama(0)), Checkpoint.open(tiny_llama(1, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied
    with pytest.raises(CompatibilityError, match=r"lacks 1 tensor\(s\) of .* \(lm_head.weight\)"):
        check_compatible([untied, tied])
    with pytest.raises(CompatibilityError, match=r"has 1 extra tensor\(s\) \(lm_head.weight\)"):
        check_compatible([tied, untied])


def test_shape_mismatches_list_both_shapes(tiny_llama):
    narrow, wide = Checkpoint.open(tiny_llama(0)), Checkpoint.open(tiny_llama(0, hidden_size=64))
    with pytest.raises(CompatibilityError) as info:
        check_compatible([narrow, wide])
    message = str(info.value)
    assert "differs in shape" in message
    assert "model.layers.0.input_layernorm.weight [32] vs [64]" in message
    assert message.count(" vs ") == 5  # at most five listed


def test_different_tokenizers_of_the_same_size_are_refused_without_a_choice(tiny_llama):
    a = Checkpoint.open(tiny_llama(0))
    b = Checkpoint.open(tiny_llama(1, vocab_characters=TEST_CHARACTERS.replace("?", "!")))
    assert a.shape("lm_head.weight") == b.shape("lm_head.weight")
    with pytest.raises(CompatibilityError, match="The tokenizers of .* differ; choose a tokenizer source"):
        check_compatible([a, b])
    # Choosing one does not make rows of different tokens line up: '!' sorts first, shifting the ids.
    index = 4 + sorted(set(TEST_CHARACTERS.replace("?", "!"))).index("!")
    token_in_a = sorted(set(TEST_CHARACTERS))[index - 4]
    with pytest.raises(
        CompatibilityError,
        match=f"Token id {index} is '!' in .* but {re.escape(repr(token_in_a))} in the tokenizer",
    ):
        check_compatible([a, b], tokenizer_source=a)


def test_vocabulary_size_mismatch_needs_a_tokenizer_source_and_records_the_row_rule(tiny_llama):
    small = Checkpoint.open(tiny_llama(0))
    large = Checkpoint.open(tiny_llama(1, vocab_characters=TEST_CHARACTERS + TAIL))
    rows_small, rows_large = small.shape("lm_head.weight")[0], large.shape("lm_head.weight")[0]
    assert rows_large == rows_small + len(TAIL)
    with pytest.raises(
        CompatibilityError,
        match=f"Tensor 'lm_head.weight' has {rows_small} vocabulary rows in .* but {rows_large} in",
    ):
        check_compatible([small, large])

    padded = check_compatible([small, large], tokenizer_source=large)
    # config and tokenizer come from the tokenizer source, whose config already states its rows
    assert padded.tokenizer_donor == large.path and padded.config_donor == large.path
    assert padded.config_updates == {}
    assert padded.row_alignments == (
        RowAlignment("lm_head.weight", small.path, rows_small, rows_large),
        RowAlignment("model.embed_tokens.weight", small.path, rows_small, rows_large),
    )
    assert "2 vocabulary tensor(s) truncated or padded to 53 rows" in padded.verdict

    truncated = check_compatible([small, large], tokenizer_source=small)
    assert truncated.config_updates == {}
    assert {(a.model, a.rows, a.target_rows) for a in truncated.row_alignments} == {
        (large.path, rows_large, rows_small)
    }
    stranger = Checkpoint.open(tiny_llama(2))
    with pytest.raises(CompatibilityError, match="must be one of the merged models"):
        check_compatible([small, large], tokenizer_source=stranger)


def test_align_rows_keeps_shared_ids_and_pads_from_the_source():
    tensor = torch.arange(6.0).reshape(3, 2)
    filler = -torch.arange(10.0).reshape(5, 2)
    padded = align_rows(tensor, 5, filler)
    assert padded.tolist() == [[0, 1], [2, 3], [4, 5], [-6, -7], [-8, -9]]
    assert align_rows(filler, 3, tensor).tolist() == filler[:3].tolist()


def test_llava_language_tower_merges_with_llama_through_a_prefix_map(tiny_llava, tiny_llama):
    llava, llama = Checkpoint.open(tiny_llava), Checkpoint.open(tiny_llama(3))
    with pytest.raises(CompatibilityError, match="lacks"):
        check_compatible([llava, llama])
    report = check_compatible([llava, llama], prefix_map={"language_model.": ""})
    assert report.tensor_names == tuple(f"language_model.{name}" for name in llama.tensor_names())
    assert report.num_layers == 4 and report.model_type == "llava"
    assert report.config_donor == llava.path
    # The map also works the other way round (the Llama is the reference).
    reverse = check_compatible([llama, llava], prefix_map={"": "language_model."})
    assert reverse.tensor_names == tuple(llama.tensor_names())
    wide = Checkpoint.open(tiny_llama(3, hidden_size=64))
    with pytest.raises(
        CompatibilityError, match=r"language_model.model.layers.0.input_layernorm.weight \[32\] vs \[64\]"
    ):
        check_compatible([llava, wide], prefix_map={"language_model.": ""})
