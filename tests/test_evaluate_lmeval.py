"""lm-eval adapter on a local YAML task + JSONL (no network), checked against our own choice scorer."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import write_task_files
from evomerge.errors import TaskError
from evomerge.evaluate import Evaluator, load_task

pytest.importorskip("lm_eval")

CHOICES = ["12", "7", "100", "3"]
ROWS = [{"question": f"{i}*{i + 2}", "choices": CHOICES, "answer": i % 4} for i in range(8)]

LM_EVAL_TASK = """\
task: evomerge_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}="
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared machine: one thread is much faster
    yield
    torch.set_num_threads(threads)


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    from evomerge.evaluate.lmeval import evaluate_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(TaskError, match=r"pip install 'evomerge\[lmeval\]'"):
        evaluate_lm_eval(None, None, ["anything"])


def test_lm_eval_task_scores_like_our_choice_scorer(tmp_path, tiny_llama, one_thread):
    from evomerge.evaluate import evaluate_lm_eval

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    task_dir = tmp_path / "lm_eval_tasks"
    task_dir.mkdir()
    (task_dir / "tiny.yaml").write_text(LM_EVAL_TASK.format(data=data))
    path = tiny_llama(seed=0)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    report = evaluate_lm_eval(
        model,
        tokenizer,
        ["evomerge_tiny_choice"],
        include_path=task_dir,
        include_defaults=False,
        batch_size=4,
    )
    ours = load_task(
        write_task_files(
            tmp_path / "ours",
            ROWS,
            [{"question": "x", "choices": CHOICES, "answer": 0}],
            scorer="choice",
            scorer_args={"choices_field": "choices"},
        )
    )
    expected = Evaluator(tokenizer, [ours], batch_size=4).evaluate(model)["t"]
    assert 0.0 < expected.score < 1.0  # a mix of right and wrong documents, so the comparison has teeth
    score = report["evomerge_tiny_choice"]
    assert score.n == len(ROWS) and score.indices == list(range(len(ROWS)))
    assert score.values == expected.values
    assert score.score == pytest.approx(expected.score)

    with pytest.raises(
        TaskError, match="'evomerge_tiny_choise' is not known.*did you mean 'evomerge_tiny_choice'"
    ):
        evaluate_lm_eval(
            model, tokenizer, ["evomerge_tiny_choise"], include_path=task_dir, include_defaults=False
        )
