"""Scorers against hand-written adversarial generations (expected values written by hand)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge.evaluate import get_scorer_spec, last_number, numbers_equal, scorer_names, truncate_at_stop
from evomerge.evaluate.scorers import GenerativeScorer, LoglikScorer


def build(name: str, **args) -> GenerativeScorer:
    spec = get_scorer_spec(name)
    scorer = spec.build(spec.args_model.model_validate(args))
    assert isinstance(scorer, GenerativeScorer)
    return scorer


def test_registry_lists_the_five_scorers():
    assert scorer_names() == ["choice", "exact", "number", "perplexity", "regex"]
    for name in ("choice", "perplexity"):
        spec = get_scorer_spec(name)
        assert isinstance(spec.build(spec.args_model()), LoglikScorer)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", "42"),
        ("3 apples and 4 pears make 7", "7"),  # extra numbers before the answer
        ("Total: 1,234,567 yen", "1234567"),  # thousands separators
        ("it dropped to -17 degrees", "-17"),  # negative
        ("pi is about 3.14", "3.14"),  # decimal; the final '.' is punctuation, not part of it
        ("half is .5", ".5"),
        ("1, 2, 3", "3"),  # comma+space separates numbers, does not join them
        ("no digits here", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_numbers_compare_exactly_not_by_float_formatting():
    assert numbers_equal("3.0", "3")
    assert numbers_equal("1234", "1,234")
    assert numbers_equal("0.3", 0.3)
    assert not numbers_equal("0.30000000000000004", "0.3")
    assert not numbers_equal("-5", "5")
    assert not numbers_equal("abc", "5")


def test_number_scorer_takes_the_last_number_only():
    scorer = build("number")
    assert scorer.score("5 + 7 = 12", 12) == 1.0
    assert scorer.score("12 is wrong, it is 13", 12) == 0.0  # the last number decides
    assert scorer.score("-3", "-3") == 1.0
    assert scorer.score("2.50", "2.5") == 1.0
    assert scorer.score("", "0") == 0.0  # empty generation
    assert scorer.score("nothing", "0") == 0.0


def test_stop_string_truncates_before_scoring():
    scorer = build("number")
    # The right answer appears only after the stop string: it must not count.
    assert scorer.score("wrong 3\n answer 12", 12, stop=["\n"]) == 0.0
    assert scorer.score("12\n5", 12, stop=["\n"]) == 1.0
    assert truncate_at_stop("a###b\nc", ["\n", "###"]) == "a"  # earliest stop wins
    assert truncate_at_stop("abc", [""]) == "abc"  # an empty stop string is ignored


def test_exact_scorer_strips_and_optionally_ignores_case():
    assert build("exact").score("  Tokyo \n", "Tokyo") == 1.0
    assert build("exact").score("tokyo", "Tokyo") == 0.0
    assert build("exact", ignore_case=True).score("TOKYO", "tokyo") == 1.0
    assert build("exact").score("Tokyo station", "Tokyo") == 0.0
    assert build("exact").score("   ", " ") == 0.0  # an empty answer never counts


def test_regex_scorer_extracts_a_group():
    scorer = build("regex", pattern=r"answer:\s*(\w+)")
    assert scorer.score("so the answer: blue.", "blue") == 1.0
    assert scorer.score("blue", "blue") == 0.0  # no match, no credit
    named = build("regex", pattern=r"#(?P<ans>\d+)", group="ans")
    assert named.score("step 1 #42 end", "42") == 1.0


def test_charset_counts_only_answers_in_the_required_script():
    japanese = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
    scorer = build("exact")
    assert scorer.score("東京", "東京", charset=japanese) == 1.0
    assert scorer.score("東 京", "東 京", charset=japanese) == 1.0  # spaces are ignored
    assert scorer.score("Tokyo", "Tokyo", charset=japanese) == 0.0  # right answer, wrong language
    assert scorer.score("東京x", "東京x", charset=japanese) == 0.0  # one foreign character is enough
    digits = re.compile(r"[0-9]")
    assert build("number").score("答えは 12", "12", charset=digits) == 1.0  # checks the extracted answer
    assert build("number").score("-12", "-12", charset=digits) == 0.0  # '-' is outside the charset


def test_response_charset_checks_the_whole_response_not_only_the_answer():
    japanese_or_digits = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff0-9。、]")
    number = build("number")
    english = "Let me think in English. The answer is 42"
    # The extracted answer "42" is in the allowed script, so only the whole-response check catches it.
    assert number.score(english, "42", charset=japanese_or_digits) == 1.0
    assert number.score(english, "42", response_charset=japanese_or_digits) == 0.0
    assert number.score("答えは42です。", "42", response_charset=japanese_or_digits) == 1.0
    # Only the response up to the stop string is checked.
    assert number.score("答えは42\nThe answer is 42", "42", stop=["\n"], response_charset=japanese_or_digits) == 1.0


def test_a_task_with_response_charset_scores_a_correct_answer_in_the_wrong_script_zero(zoo, tmp_path):
    """End to end on a real model: the math specialist writes sums in language-1 digits, correctly."""
    import json

    import torch

    from conftest import write_task_files
    from evomerge.evaluate import Evaluator, load_causal_lm, load_task

    rows = [json.loads(line) for line in (zoo.tasks["add"].parent / "add_test.jsonl").read_text().splitlines()][:64]
    model, tokenizer = load_causal_lm(zoo.specialists["math"], device="cpu", dtype=torch.float32)
    scores = {}
    checks = (("plain", {}), ("l2_only", {"response_charset": "[a-j]"}), ("japanese", {"response_language": "ja"}))
    for name, extra in checks:
        path = write_task_files(tmp_path / name, rows[60:], rows[:60], name=name, scorer="number", **extra)
        scores[name] = Evaluator(tokenizer, [load_task(path)], split="test").evaluate(model)[name].score
    assert scores["plain"] > 0.3  # right answers...
    assert scores["l2_only"] == 0.0  # ...in the wrong script
    assert scores["japanese"] == 0.0  # ...and in no language the identifier calls Japanese


def test_response_language_asks_a_language_identifier_about_the_whole_response(tmp_path):
    from evomerge.evaluate.language import language_check

    japanese = language_check("ja", tmp_path / "t.yaml")
    number = build("number")
    assert number.score("答えは42です。", "42", response_language=japanese) == 1.0
    assert number.score("Let me think in English. The answer is 42", "42", response_language=japanese) == 0.0
    # The answer is right and the response Japanese up to the stop; what follows the stop is not judged.
    assert number.score("答えは42です。\nThe answer is 42", "42", stop=["\n"], response_language=japanese) == 1.0
    assert number.score("   ", "42", response_language=japanese) == 0.0
    assert language_check(None, tmp_path / "t.yaml") is None


def test_an_unknown_or_unavailable_language_identifier_is_a_task_error(tmp_path, monkeypatch):
    import sys

    from conftest import write_task_files
    from evomerge.errors import TaskError
    from evomerge.evaluate import load_task

    rows = [{"question": "1+1", "answer": "2"}]
    path = write_task_files(tmp_path, rows, rows, response_language="klingon")
    with pytest.raises(TaskError, match=r"t\.yaml: field 'response_language' is 'klingon', which is not an ISO"):
        load_task(path)
    monkeypatch.setitem(sys.modules, "py3langid", None)  # the extra not installed
    path = write_task_files(tmp_path, rows, rows, response_language="ja")
    with pytest.raises(TaskError, match=r"needs the optional language identifier \(pip install 'evomerge\[langid\]'\)"):
        load_task(path)


@given(st.integers(min_value=-(10**12), max_value=10**12), st.text(alphabet="abc xyz:=", max_size=12))
def test_last_number_recovers_any_formatted_integer(value, prefix):
    assert last_number(f"{prefix} 7 then {value:,}") == str(value)
    assert numbers_equal(last_number(f"{prefix}{value}.00") or "", value)


@given(st.text(max_size=30), st.lists(st.text(min_size=1, max_size=3), max_size=3))
def test_truncation_is_a_prefix_free_of_stop_strings(text, stops):
    cut = truncate_at_stop(text, stops)
    assert text.startswith(cut)
    assert not any(stop in cut for stop in stops)
    # Maximal: the cut ends right where the first stop string begins (or the text ends).
    assert cut == text or any(text[len(cut) :].startswith(stop) for stop in stops)
