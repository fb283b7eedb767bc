"""Parents with different vocabularies, end to end through the planner: `run_merge` with a
`tokenizer_source` aligns embedding and LM-head rows by token id (models.compat's rule: rows both
vocabularies have are merged by the operator; rows a parent lacks come from the tokenizer source, so
they keep its values; rows beyond the source's vocabulary are dropped), writes the source's vocabulary
size and tokenizer, and the result loads and generates with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import TEST_CHARACTERS, read_tensors
from evomerge.merge.recipe import parse_recipe
from evomerge.merge.stream import run_merge

# Characters that sort after every test character: the larger vocabulary is the smaller one plus three
# ids at the end, so both tokenizers agree on every id they share (the char tokenizer sorts its alphabet).
TAIL = "{|}"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def parents(tiny_llama) -> dict[str, Path]:
    return {
        "small": tiny_llama(0),
        "large": tiny_llama(1, vocab_characters=TEST_CHARACTERS + TAIL),
        "small2": tiny_llama(2),
    }


def fit_rows(tensor: torch.Tensor, rows: int, source: torch.Tensor) -> torch.Tensor:
    """The expected alignment, written out: the first `rows` rows, missing ones from `source`."""
    if tensor.shape[0] >= rows:
        return tensor[:rows]
    return torch.cat([tensor, source[tensor.shape[0] : rows]])


def linear(weights: dict[str, float], tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """mergekit's linear merge (normalized weights)."""
    return sum(weights[name] * tensors[name] for name in weights) / sum(weights.values())


CASES = {
    # The smaller parent is padded with the larger (source's) rows: 1/4 small + 3/4 large on shared
    # ids, exactly the source's rows on the three new ones.
    "linear-pad": {
        "recipe": {"method": "linear", "models": [("small", {"weight": 1.0}), ("large", {"weight": 3.0})]},
        "source": "large",
        "expect": lambda t: linear({"small": 1.0, "large": 3.0}, t),
    },
    # The larger parent loses its three extra rows.
    "linear-truncate": {
        "recipe": {"method": "linear", "models": [("small", {"weight": 1.0}), ("large", {"weight": 3.0})]},
        "source": "small",
        "expect": lambda t: linear({"small": 1.0, "large": 3.0}, t),
    },
    # In delta space the padded rows of the base and of the other small parent equal the source's, so
    # their task vectors are zero there and the new ids keep the source's embedding.
    "task-arithmetic-pad-the-base": {
        "recipe": {
            "method": "task_arithmetic",
            "base_model": "small",
            "models": [("large", {"weight": 0.6}), ("small2", {"weight": 0.3})],
        },
        "source": "large",
        "expect": lambda t: t["small"] + 0.6 * (t["large"] - t["small"]) + 0.3 * (t["small2"] - t["small"]),
    },
}


def build_recipe(case: dict, parents: dict[str, Path]):
    spec = case["recipe"]
    data = {
        "method": spec["method"],
        "models": [{"model": str(parents[name]), "parameters": params} for name, params in spec["models"]],
        "tokenizer_source": str(parents[case["source"]]),
    }
    if "base_model" in spec:
        data["base_model"] = str(parents[spec["base_model"]])
    return parse_recipe(data)


@pytest.mark.parametrize("case_name", list(CASES))
def test_vocabulary_rows_follow_the_tokenizer_source(case_name, parents, tmp_path) -> None:
    case = CASES[case_name]
    out = tmp_path / "merged"
    run_merge(build_recipe(case, parents), out)

    weights = {name: read_tensors(path) for name, path in parents.items()}
    source = weights[case["source"]]
    target_rows = source["lm_head.weight"].shape[0]
    merged = read_tensors(out)
    assert set(merged) == set(source)
    for tensor_name, value in merged.items():
        inputs = {name: tensors[tensor_name] for name, tensors in weights.items()}
        if tensor_name in VOCAB_TENSORS:
            inputs = {name: fit_rows(t, target_rows, source[tensor_name]) for name, t in inputs.items()}
        torch.testing.assert_close(value, case["expect"](inputs), msg=tensor_name)
    shared_rows = min(t["lm_head.weight"].shape[0] for t in weights.values())
    if target_rows > shared_rows:  # the new ids really are the source's rows, not a blend
        torch.testing.assert_close(merged["lm_head.weight"][shared_rows:], source["lm_head.weight"][shared_rows:])

    config = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert config["vocab_size"] == target_rows == len(tokenizer)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(parents[case["source"]]).get_vocab()

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == target_rows
    prompt = tokenizer("7+5=" + TAIL[: target_rows - shared_rows], return_tensors="pt")
    # The new ids are read (and so are their embedding rows) wherever the source added some.
    assert int((prompt["input_ids"] >= shared_rows).sum()) == target_rows - shared_rows
    generated = model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
