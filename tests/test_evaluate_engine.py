"""The engine against independent references: `model.generate` per example and unpadded forwards."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_task_files
from evomerge.errors import TaskError
from evomerge.evaluate import Evaluator, load_task, mean_and_stderr, truncate_at_stop

MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine: one intra-op thread is ~10x faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tiny_llama):
    path = tiny_llama(seed=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _rows(seed: int, count: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        # Prompt lengths from 1 to 14 characters so left padding really varies within a batch.
        question = "".join(rng.choice("0123456789+-") for _ in range(1 + (i * 5) % 14))
        rows.append({"question": f"{question}#{seed}.{i}", "answer": str(i)})
    return rows


def _reference(model, tokenizer, prompt: str, eos: int | None = None) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, ids["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id if eos is None else eos
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_matches_generate_per_example(lm, tmp_path):
    model, tokenizer = lm
    task = load_task(
        write_task_files(tmp_path, _rows(1, 11), _rows(2, 3), generation={"max_new_tokens": MAX_NEW})
    )
    produced = Evaluator(tokenizer, [task], batch_size=4).generate(model, "t", range(11))
    for i, prompt in enumerate(task.prompts("search")):
        assert produced[i].ids == _reference(model, tokenizer, prompt), prompt


def test_decoding_uses_the_current_cache_api_without_deprecation_warnings(lm, tmp_path):
    """transformers deprecates keyword names a release ahead of removing them: any such warning from a
    call our decoding loop makes (a `past_key_values=` left behind, say) is a break waiting to happen."""
    model, tokenizer = lm
    task = load_task(write_task_files(tmp_path, _rows(1, 6), _rows(2, 3), generation={"max_new_tokens": MAX_NEW}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Evaluator(tokenizer, [task], batch_size=4).evaluate(model)
    deprecations = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]


def test_per_row_eos_stops_like_generate(lm, tmp_path):
    model, tokenizer = lm
    task = load_task(
        write_task_files(tmp_path, _rows(3, 9), _rows(4, 3), generation={"max_new_tokens": MAX_NEW})
    )
    evaluator = Evaluator(tokenizer, [task], batch_size=9)
    free = evaluator.generate(model, "t", range(9))
    # Declare the most common generated token to be EOS: rows now stop at different steps.
    counts: dict[int, int] = {}
    for out in free.values():
        for token in out.ids[1:]:
            counts[token] = counts.get(token, 0) + 1
    eos = max(counts, key=counts.get)
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        stopped = evaluator.generate(model, "t", range(9))
        for i, prompt in enumerate(task.prompts("search")):
            assert stopped[i].ids == _reference(model, tokenizer, prompt, eos)
        assert {out.stopped_by for out in stopped.values()} >= {"eos"}
        assert len({len(out.ids) for out in stopped.values()}) > 1
    finally:
        model.generation_config.eos_token_id = original


def test_stop_strings_end_rows_at_the_first_occurrence(lm, tmp_path):
    model, tokenizer = lm
    rows = _rows(5, 8)
    texts = [tokenizer.decode(_reference(model, tokenizer, f"{r['question']}=")) for r in rows]
    stop = max(set("".join(texts)), key="".join(texts).count)  # a character the model often emits
    task = load_task(
        write_task_files(tmp_path, rows, _rows(6, 2), generation={"max_new_tokens": MAX_NEW, "stop": [stop]})
    )
    evaluator = Evaluator(tokenizer, [task], batch_size=3)
    produced = evaluator.generate(model, "t", range(8))
    report = evaluator.evaluate(model)
    for i, text in enumerate(texts):
        cut = text.find(stop)
        expected_tokens = MAX_NEW if cut == -1 else cut + 1  # char tokenizer: one token per character
        assert len(produced[i].ids) == expected_tokens
        assert report["t"].outputs[i] == truncate_at_stop(text, [stop])
    assert any(p.stopped_by == "stop" for p in produced.values())


def test_scores_stderr_and_token_counts(lm, tmp_path):
    model, tokenizer = lm
    rows = _rows(7, 10)
    generations = [tokenizer.decode(_reference(model, tokenizer, f"{r['question']}=")) for r in rows]
    for i in (0, 3, 4, 8):  # these four answers are exactly what the model will say
        rows[i]["answer"] = generations[i]
    task = load_task(write_task_files(tmp_path, rows, _rows(8, 2), generation={"max_new_tokens": MAX_NEW}))
    score = Evaluator(tokenizer, [task], batch_size=4).evaluate(model)["t"]
    assert score.values == [1.0 if i in (0, 3, 4, 8) else 0.0 for i in range(10)]
    assert score.score == pytest.approx(0.4)
    assert score.stderr == pytest.approx(math.sqrt(0.4 * 0.6 / 10))
    assert score.n == 10 and score.indices == list(range(10))
    assert score.prompt_tokens == sum(len(f"{r['question']}=") for r in rows)
    assert score.generated_tokens == sum(
        len(tokenizer(g, add_special_tokens=False)["input_ids"]) for g in generations
    )


def test_indices_and_limit_select_examples(lm, tmp_path):
    model, tokenizer = lm
    task = load_task(write_task_files(tmp_path, _rows(9, 6), _rows(10, 5), generation={"max_new_tokens": 3}))
    evaluator = Evaluator(tokenizer, [task], "test", batch_size=2)
    full = evaluator.evaluate(model)["t"]
    assert evaluator.evaluate(model, limit=2)["t"].outputs == full.outputs[:2]
    picked = evaluator.evaluate(model, indices={"t": [4, 1]})["t"]
    assert picked.indices == [4, 1] and picked.outputs == [full.outputs[4], full.outputs[1]]
    with pytest.raises(ValueError, match="outside"):
        evaluator.evaluate(model, indices={"t": [5]})
    with pytest.raises(ValueError, match="unknown tasks"):
        evaluator.evaluate(model, indices={"u": [0]})


def test_indices_evaluate_only_the_tasks_named(lm, tmp_path):
    model, tokenizer = lm
    first = load_task(
        write_task_files(tmp_path, _rows(13, 4), _rows(14, 2), name="a", generation={"max_new_tokens": 2})
    )
    second = load_task(
        write_task_files(tmp_path, _rows(15, 4), _rows(16, 2), name="b", generation={"max_new_tokens": 2})
    )
    evaluator = Evaluator(tokenizer, [first, second])
    assert list(evaluator.evaluate(model).scores) == ["a", "b"]
    assert list(evaluator.evaluate(model, indices={"b": [2, 3]}).scores) == ["b"]
    assert list(evaluator.evaluate(model, indices={"a": [], "b": [0]}).scores) == ["b"]  # empty list: skipped


def _manual_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, int]:
    ctx = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    total = sum(float(logits[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
    return total, len(whole) - len(ctx)


def test_choice_and_perplexity_match_unpadded_forwards(lm, tmp_path):
    model, tokenizer = lm
    choices = ["12", "7", "100", "3"]
    rows = [{"question": f"{i}*{i + 1}", "choices": choices, "answer": i % 4} for i in range(7)]
    test = [{"question": "9*9", "choices": choices, "answer": 0}]
    choice_task = load_task(
        write_task_files(
            tmp_path / "c", rows, test, name="c", scorer="choice", scorer_args={"choices_field": "choices"}
        )
    )
    ppl_rows = [{"question": f"{i}+{i}", "answer": str(2 * i)} for i in range(5)]
    ppl_task = load_task(
        write_task_files(
            tmp_path / "p", ppl_rows, [{"question": "x", "answer": "y"}], name="p", scorer="perplexity"
        )
    )
    report = Evaluator(tokenizer, [choice_task, ppl_task], batch_size=5).evaluate(model)
    expected = []
    for row in rows:
        totals = [_manual_logprob(model, tokenizer, f"{row['question']}=", c)[0] for c in choices]
        expected.append(1.0 if totals.index(max(totals)) == row["answer"] else 0.0)
    assert report["c"].values == expected
    nll = []
    for row in ppl_rows:
        total, count = _manual_logprob(model, tokenizer, f"{row['question']}=", row["answer"])
        nll.append(total / count)
    assert report["p"].values == pytest.approx(nll, abs=1e-5)
    assert report["p"].score == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert report["p"].stderr == pytest.approx(mean_and_stderr(nll)[1], abs=1e-5)


def test_weights_overwritten_in_place_are_seen(lm, tiny_llama, tmp_path):
    _, tokenizer = lm
    model = AutoModelForCausalLM.from_pretrained(tiny_llama(seed=0)).eval()
    other = AutoModelForCausalLM.from_pretrained(tiny_llama(seed=1)).eval()
    task = load_task(write_task_files(tmp_path, _rows(11, 6), _rows(12, 2), generation={"max_new_tokens": 6}))
    evaluator = Evaluator(tokenizer, [task], batch_size=4)
    expected_other = evaluator.evaluate(other)["t"].outputs
    first = evaluator.evaluate(model)["t"]
    with torch.no_grad():  # what the search does between trials
        for mine, theirs in zip(model.parameters(), other.parameters(), strict=True):
            mine.copy_(theirs)
    assert evaluator.evaluate(model)["t"].outputs == expected_other != first.outputs


def test_empty_prompt_and_empty_continuation(lm, tmp_path):
    model, tokenizer = lm
    rows = [{"question": "", "answer": "1"}, {"question": "5", "answer": "2"}]
    task = load_task(
        write_task_files(
            tmp_path / "g",
            rows,
            [{"question": "9", "answer": "0"}],
            prompt="{question}",
            generation={"max_new_tokens": 8},
        )
    )
    produced = Evaluator(tokenizer, [task]).generate(model, "t", [0])
    # An empty prompt is conditioned on BOS alone, exactly like generate() given just BOS.
    bos = torch.tensor([[tokenizer.bos_token_id]])
    expected = model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=False, max_new_tokens=8)
    tokens = expected[0, 1:].tolist()
    eos = model.generation_config.eos_token_id
    assert produced[0].ids == (tokens[: tokens.index(eos)] if eos in tokens else tokens)
    ppl = load_task(
        write_task_files(
            tmp_path / "p", [{"question": "1", "answer": ""}, *rows[1:]], rows[:1], scorer="perplexity"
        )
    )
    with pytest.raises(TaskError, match="search example 1 has an empty answer"):
        Evaluator(tokenizer, [ppl])


def test_answers_against_rivals_match_unpadded_forwards(lm, tmp_path):
    """`against_rival`: per example, the product over the reference answer's (and stop's) tokens of
    p(token) / (p(token) + p(most probable other token)), batched with padding, equals the same product
    from one unpadded forward per example."""
    model, tokenizer = lm
    rows = _rows(5, 9)
    task = load_task(write_task_files(tmp_path / "s", rows, _rows(6, 2), name="s"))
    report = Evaluator(tokenizer, [task], batch_size=4).answer_probabilities(model, {"s": range(9)}, against_rival=True)
    for i, row in enumerate(rows):
        context = tokenizer(f"{row['question']}=")["input_ids"]
        whole = tokenizer(f"{row['question']}={row['answer']}\n")["input_ids"]
        with torch.no_grad():
            probabilities = model(torch.tensor([whole])).logits[0].softmax(-1)
        expected = 1.0
        for t in range(len(context), len(whole)):
            row_p = probabilities[t - 1].clone()
            reference = float(row_p[whole[t]])
            row_p[whole[t]] = 0.0
            expected *= reference / (reference + float(row_p.max()))
        assert report["s"].values[i] == pytest.approx(expected, rel=1e-4)
    assert all(0.0 < v < 1.0 for v in report["s"].values)


def test_answer_probabilities_match_unpadded_forwards(lm, tmp_path):
    """The teacher-forced probability of the reference answer and the stop (or EOS, without a stop string),
    batched with padding, equals one unpadded forward per example; a log-likelihood task is refused."""
    model, tokenizer = lm
    rows = _rows(3, 9)
    stopped = load_task(write_task_files(tmp_path / "s", rows, _rows(4, 2), name="s"))
    unstopped = load_task(write_task_files(tmp_path / "e", rows, _rows(4, 2), name="e", generation={"max_new_tokens": 8}))
    report = Evaluator(tokenizer, [stopped, unstopped], batch_size=4).answer_probabilities(
        model, {"s": range(9), "e": [0, 4, 8]}
    )
    for i, row in enumerate(rows):
        total, _ = _manual_logprob(model, tokenizer, f"{row['question']}=", row["answer"] + "\n")
        assert report["s"].values[i] == pytest.approx(math.exp(total), rel=1e-4)
    for value, i in zip(report["e"].values, [0, 4, 8], strict=True):
        context = tokenizer(f"{rows[i]['question']}=")["input_ids"]
        whole = tokenizer(f"{rows[i]['question']}={rows[i]['answer']}")["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
        total = sum(float(logits[t - 1, whole[t]]) for t in range(len(context), len(whole)))
        assert value == pytest.approx(math.exp(total), rel=1e-4)
    assert report["s"].indices == list(range(9)) and report["e"].n == 3 and report["s"].generated_tokens == 0
    choice = load_task(write_task_files(
        tmp_path / "c", [{"question": "1", "choices": ["a", "b"], "answer": 0}], [{"question": "2", "choices": ["a", "b"], "answer": 1}],
        name="c", scorer="choice", scorer_args={"choices_field": "choices"},
    ))
    with pytest.raises(TaskError, match="log-likelihood"):
        Evaluator(tokenizer, [choice]).answer_probabilities(model, {"c": [0]})
