"""Task files: every supported data layout loads the same rows; every bad file is one TaskError sentence."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import write_task_files
from evomerge.errors import TaskError
from evomerge.evaluate import load_task
from evomerge.evaluate.task import MAX_PROMPT_CHARACTERS

SEARCH = [{"question": f"{i}+1", "answer": str(i + 1)} for i in range(6)]
TEST = [{"question": f"{i}+2", "answer": str(i + 2)} for i in range(4)]


def test_jsonl_per_split_files(tmp_path):
    task = load_task(write_task_files(tmp_path, SEARCH, TEST))
    assert task.name == "t"
    assert task.examples("search") == SEARCH
    assert task.answers("test") == [row["answer"] for row in TEST]
    assert task.prompts("test")[0] == "0+2="
    assert task.is_generative


def test_csv_and_parquet_give_the_same_rows_as_jsonl(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [dict(r, split="search") for r in SEARCH] + [dict(r, split="test") for r in TEST]
    with (tmp_path / "all.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer", "split"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all.parquet")
    for file in ("all.csv", "all.parquet"):
        path = write_task_files(
            tmp_path / file.replace(".", "_"), [], [], data={"path": f"../{file}", "split_field": "split"}
        )
        task = load_task(path)
        assert [r["question"] for r in task.examples("search")] == [r["question"] for r in SEARCH]
        assert [r["answer"] for r in task.examples("test")] == [r["answer"] for r in TEST]


def test_locally_cached_datasets_directory_loads_offline(tmp_path):
    pytest.importorskip("datasets")
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEARCH))
    (data_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEST))
    path = write_task_files(tmp_path, [], [], data={"dataset": str(data_dir)})
    task = load_task(path)
    assert task.examples("search") == SEARCH
    assert task.examples("test") == TEST


def test_uncached_hub_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("datasets")
    path = write_task_files(tmp_path, [], [], data={"dataset": "evomerge-no-such-org/no-such-dataset"})
    with pytest.raises(TaskError, match=r"not available in the local cache.*HF_DATASETS_OFFLINE=1"):
        load_task(path)


def test_fewshot_examples_come_from_the_search_split_only(tmp_path):
    task = load_task(write_task_files(tmp_path, SEARCH, TEST, fewshot=2))
    solved_search = {f"{r['question']}={r['answer']}" for r in SEARCH}
    for split in ("search", "test"):
        for index, prompt in enumerate(task.prompts(split)):
            *shots, query = prompt.split("\n")
            assert len(shots) == 2 and len(set(shots)) == 2
            assert set(shots) <= solved_search
            assert query == f"{task.examples(split)[index]['question']}="
            if split == "search":  # never its own answer as a shot
                assert f"{query}{task.examples(split)[index]['answer']}" not in shots
    assert task.prompts("test") == load_task(tmp_path / "t.yaml").prompts("test")  # deterministic


def test_fingerprint_tracks_task_file_and_data_bytes(tmp_path):
    path = write_task_files(tmp_path, SEARCH, TEST)
    before = load_task(path).fingerprint()
    assert load_task(path).fingerprint() == before
    write_task_files(tmp_path, SEARCH, [*TEST, {"question": "9+9", "answer": "18"}])
    after_data = load_task(path).fingerprint()
    assert after_data != before
    path.write_text(path.read_text().replace("max_new_tokens: 8", "max_new_tokens: 9"))
    assert load_task(path).fingerprint() != after_data


def _error(path: Path) -> str:
    with pytest.raises(TaskError) as info:
        load_task(path)
    message = str(info.value)
    assert "\n" not in message
    return message


REGEX = {"scorer": "regex"}


# A top-level unknown key, a missing field, a wrong type, an unknown scorer, an empty split, malformed
# YAML, a missing data file and a bad JSONL line go through the CLI in the corpus (test_bad_inputs.py).
@pytest.mark.parametrize(
    ("spec", "sentence"),
    [
        # pydantic puts the union member's tag in the location (data -> files); users never wrote it...
        ({"data": {"search": "s.jsonl", "tset": "t.jsonl"}}, "unknown key 'data.tset'; did you mean 'test'?"),
        ({"data": {"path": "all.jsonl"}}, "missing required field 'data.split_field'"),
        # ... while a field that shares a member's tag stays.
        ({"data": {"dataset": 5}}, "field 'data.dataset' is invalid: Input should be a valid string (got 5)"),
        ({"generation": {"max_new_token": 3}}, "key 'generation.max_new_token'; did you mean 'max_new_tokens'?"),
        ({"fewshot": "many"}, "field 'fewshot' is invalid: Input should be a valid integer, unable to"),
        ({**REGEX, "scorer_args": {"patern": "x"}}, "'regex'): unknown key 'scorer_args.patern'; did you mean"),
        ({**REGEX, "scorer_args": {}}, "'regex'): missing required field 'scorer_args.pattern'"),
        ({**REGEX, "scorer_args": {"pattern": "("}}, "field 'scorer_args.pattern' is not a valid regex"),
    ],
)
def test_bad_field_is_named_as_written_in_the_file(tmp_path, spec, sentence):
    message = _error(write_task_files(tmp_path, SEARCH, TEST, **spec))
    assert message.startswith(f"task file {tmp_path / 't.yaml'}") and sentence in message


def test_overlapping_splits_report_count_and_example(tmp_path):
    path = write_task_files(tmp_path, SEARCH, [*TEST, dict(SEARCH[3], answer="other"), SEARCH[4]])
    message = _error(path)
    assert "overlap in 2 example(s)" in message and "'3+1'" in message


def test_missing_answer_and_missing_prompt_field(tmp_path):
    rows = [*TEST[:2], {"question": "7+7"}]
    assert "test example 3 has no field 'answer'" in _error(write_task_files(tmp_path, SEARCH, rows))
    assert "has no field 'q'" in _error(write_task_files(tmp_path, SEARCH, TEST, prompt="{q}?"))


def test_not_a_mapping_and_missing_task_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    assert "must be a YAML mapping" in _error(path)
    assert "does not exist" in _error(tmp_path / "absent.yaml")


def test_choice_answers_must_name_a_choice(tmp_path):
    rows = [
        {"question": "q1", "choices": ["a", "b"], "answer": 1},
        {"question": "q2", "choices": ["a", "b"], "answer": "b"},
    ]
    test = [{"question": "q3", "choices": ["a", "b"], "answer": "c"}]
    path = write_task_files(tmp_path, rows, test, scorer="choice", scorer_args={"choices_field": "choices"})
    assert "answer 'c' is neither an index into nor the text of one of its 'choices'" in _error(path)


def test_data_that_is_not_utf8_is_a_task_error(tmp_path):
    path = write_task_files(tmp_path, [{"question": "1", "answer": "1"}], [{"question": "2", "answer": "2"}])
    (tmp_path / "t_test.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(TaskError, match=r"data file .*t_test.jsonl is not UTF-8 text \(byte 17 cannot be decoded\)"):
        load_task(path)


def test_an_oversized_example_is_refused_at_load(tmp_path):
    huge = "9" * (MAX_PROMPT_CHARACTERS + 1)
    path = write_task_files(tmp_path, [{"question": "1", "answer": "1"}], [{"question": huge, "answer": "2"}])
    with pytest.raises(TaskError, match=r"test example 1 renders to 200,002 characters, over the limit of 200,000"):
        load_task(path)


def test_a_catastrophic_regex_times_out_with_a_task_error(tmp_path):
    path = write_task_files(
        tmp_path, [{"question": "1", "answer": "1"}], [{"question": "2", "answer": "2"}],
        scorer="regex", scorer_args={"pattern": "(a|aa)+$", "group": 0},
    )
    scorer = load_task(path).scorer
    with pytest.raises(TaskError, match=r"regex scorer pattern '\(a\|aa\)\+\$' took over 1 s"):
        scorer.score("a" * 40 + "!", "a")


def test_an_example_longer_than_the_model_context_is_refused_before_any_work(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import Evaluator

    model = AutoModelForCausalLM.from_pretrained(tiny_llama(0))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama(0))
    context = model.config.max_position_embeddings
    long_question = "1" * (context + 5)
    path = write_task_files(
        tmp_path, [{"question": "1", "answer": "1"}], [{"question": "2", "answer": "2"}, {"question": long_question, "answer": "3"}]
    )
    evaluator = Evaluator(tokenizer, [load_task(path)], split="test")
    with pytest.raises(TaskError, match=rf"task 't': test example 2 needs \d+ prompt tokens \+ 8 new tokens, more than the model's context of {context}"):
        evaluator.evaluate(model)
