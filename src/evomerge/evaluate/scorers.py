"""Scorers, registered by name: how a generation (or a log-likelihood) becomes a per-example value.

Two kinds exist. *Generative* scorers (`exact`, `number`, `regex`) turn the greedy generation into an
extracted answer and compare it with the reference; the value is 1.0 or 0.0. *Log-likelihood*
scorers (`choice`, `perplexity`) never generate: the engine scores continuations and the scorer
defines which continuations and how their log-probabilities become a value.

Every value is "higher is better", so any task can be a maximisation objective of the search.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import regex
from pydantic import BaseModel, ConfigDict

from evomerge.errors import TaskError

# A number: optional sign, digits with optional thousands commas, optional decimal part;
# or a bare decimal like ".5". Commas are only accepted between digit groups ("1,234"), so a
# trailing comma in "3, 4" does not glue two numbers together.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for marker in stop:
        if marker:
            position = text.find(marker)
            if position != -1:
                cut = min(cut, position)
    return text[:cut]


def last_number(text: str) -> str | None:
    """Return the last number in `text` (GSM8K-style answer extraction), commas removed, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def numbers_equal(extracted: str, reference: Any) -> bool:
    """Compare two numbers exactly (decimal arithmetic, so "3.0" == "3" and 0.1 has no float error)."""
    try:
        left = Decimal(str(extracted).replace(",", "").strip())
        right = Decimal(str(reference).replace(",", "").strip())
    except InvalidOperation:
        return False
    return left == right


def charset_ok(answer: str, charset: re.Pattern[str] | None) -> bool:
    """True when every non-space character of `answer` fully matches `charset` (None: no check).

    A deterministic script check, e.g. `"[\\u3040-\\u30ff\\u4e00-\\u9fff0-9]"` for Japanese with digits.
    The paper counted an answer only if a language identifier (fastText) found the *whole response* in
    Japanese (a task's `response_language`, `evaluate.language`); its `response_charset` applies this
    script check to the whole response, its `answer_charset` only to the extracted answer (weaker: "Let me
    think in English. The answer is 42" passes it).
    """
    if charset is None:
        return True
    return all(charset.fullmatch(char) for char in answer if not char.isspace())


def compile_charset(pattern: str | None, field: str, path: Path) -> re.Pattern[str] | None:
    """A task's charset field compiled; TaskError naming the file and field when it is no regex."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise TaskError(f"task file {path}: field '{field}' is not a valid regex ({error})") from None


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExactArgs(_Args):
    """`exact`: the stripped generation equals the stripped answer."""

    ignore_case: bool = False


class NumberArgs(_Args):
    """`number`: the last number of the generation equals the answer numerically."""


class RegexArgs(_Args):
    """`regex`: group `group` of the first match of `pattern` equals the stripped answer."""

    pattern: str
    group: int | str = 1
    ignore_case: bool = False


class ChoiceArgs(_Args):
    """`choice`: the answer is the argmax of the choices' log-likelihoods (optionally per character)."""

    choices_field: str = "choices"
    length_normalize: bool = False


class PerplexityArgs(_Args):
    """`perplexity`: value = negative mean NLL per token of the answer given the prompt (higher is better)."""


@dataclass(frozen=True)
class GenerativeScorer:
    """Extracts an answer from a generation and compares it with the reference answer."""

    extract: Callable[[str], str | None]
    matches: Callable[[str, Any], bool]

    def score(
        self,
        generation: str,
        reference: Any,
        *,
        stop: Sequence[str] = (),
        charset: re.Pattern[str] | None = None,
        response_charset: re.Pattern[str] | None = None,
        response_language: Callable[[str], bool] | None = None,
    ) -> float:
        """1.0 if the (stop-truncated) generation passes `response_charset` and `response_language` (a
        language identifier's verdict on the whole response) and its extracted answer matches and passes
        `charset`."""
        response = truncate_at_stop(generation, stop)
        if not charset_ok(response, response_charset):
            return 0.0
        if response_language is not None and not response_language(response):
            return 0.0
        extracted = self.extract(response)
        if extracted is None or not extracted.strip():
            return 0.0
        if not charset_ok(extracted, charset):
            return 0.0
        return 1.0 if self.matches(extracted, reference) else 0.0


@dataclass(frozen=True)
class LoglikScorer:
    """Scores by log-likelihood: `mode` is "choice" (argmax over choices) or "perplexity"."""

    mode: Literal["choice", "perplexity"]
    choices_field: str | None = None
    length_normalize: bool = False


Scorer = GenerativeScorer | LoglikScorer


@dataclass(frozen=True)
class ScorerSpec:
    """A registered scorer: its name, argument model and a factory from validated arguments."""

    name: str
    args_model: type[BaseModel]
    build: Callable[[Any], Scorer]
    doc: str = ""


_REGISTRY: dict[str, ScorerSpec] = {}


def register_scorer(name: str, args_model: type[BaseModel]) -> Callable[[Callable[[Any], Scorer]], Callable]:
    """Decorator registering a scorer factory `build(args) -> Scorer` under `name` (once)."""

    def decorate(build: Callable[[Any], Scorer]) -> Callable[[Any], Scorer]:
        if name in _REGISTRY:
            raise ValueError(f"scorer {name!r} is already registered")
        _REGISTRY[name] = ScorerSpec(name, args_model, build, (build.__doc__ or "").strip())
        return build

    return decorate


def scorer_names() -> list[str]:
    """Names of all registered scorers, sorted."""
    return sorted(_REGISTRY)


def get_scorer_spec(name: str) -> ScorerSpec:
    """The registered scorer `name`; KeyError if unknown (task loading turns it into a TaskError)."""
    return _REGISTRY[name]


def _same_text(ignore_case: bool) -> Callable[[str, Any], bool]:
    def matches(extracted: str, reference: Any) -> bool:
        left, right = extracted.strip(), str(reference).strip()
        if ignore_case:
            return left.casefold() == right.casefold()
        return left == right

    return matches


@register_scorer("exact", ExactArgs)
def _build_exact(args: ExactArgs) -> Scorer:
    """The stripped generation equals the stripped answer (optionally ignoring case)."""
    return GenerativeScorer(extract=str.strip, matches=_same_text(args.ignore_case))


@register_scorer("number", NumberArgs)
def _build_number(args: NumberArgs) -> Scorer:
    """The last number in the generation equals the answer numerically (commas allowed)."""
    return GenerativeScorer(extract=last_number, matches=numbers_equal)


#: Seconds one regex search may take on one generation; a pattern that backtracks catastrophically
#: (``(a|aa)+$``) would otherwise hang a whole search without a word.
REGEX_TIMEOUT_SECONDS = 1.0


@register_scorer("regex", RegexArgs)
def _build_regex(args: RegexArgs) -> Scorer:
    """A group of the first match of `pattern` in the generation equals the answer.

    Matched with the `regex` package (Python's `re` syntax), which can stop a search after a timeout.
    """
    try:
        pattern = regex.compile(args.pattern, regex.IGNORECASE if args.ignore_case else 0)
    except regex.error as error:
        raise ValueError(f"field 'scorer_args.pattern' is not a valid regex ({error})") from None
    named = isinstance(args.group, str)
    if (named and args.group not in pattern.groupindex) or (not named and not 0 <= args.group <= pattern.groups):
        groups = f"groups 0-{pattern.groups}" + (f" and {', '.join(pattern.groupindex)}" if pattern.groupindex else "")
        raise ValueError(f"field 'scorer_args.group' {args.group!r} is not a group of the pattern (it has {groups})")

    def extract(generation: str) -> str | None:
        try:
            match = pattern.search(generation, timeout=REGEX_TIMEOUT_SECONDS)
        except TimeoutError:
            raise TaskError(
                f"regex scorer pattern {args.pattern!r} took over {REGEX_TIMEOUT_SECONDS:g} s on one "
                "generation (catastrophic backtracking); simplify the pattern"
            ) from None
        return None if match is None else match.group(args.group)

    return GenerativeScorer(extract=extract, matches=_same_text(args.ignore_case))


@register_scorer("choice", ChoiceArgs)
def _build_choice(args: ChoiceArgs) -> Scorer:
    """Argmax of the log-likelihood of each choice equals the answer (an index or the choice text)."""
    return LoglikScorer("choice", choices_field=args.choices_field, length_normalize=args.length_normalize)


@register_scorer("perplexity", PerplexityArgs)
def _build_perplexity(args: PerplexityArgs) -> Scorer:
    """Negative mean NLL per token of the answer given the prompt (higher is better; ppl = exp(-value))."""
    return LoglikScorer("perplexity")


def choice_index(choices: Sequence[Any], answer: Any) -> int | None:
    """The index of the correct choice: `answer` as an int index, or the position of its text."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer).strip()
    for index, choice in enumerate(choices):
        if str(choice).strip() == text:
            return index
    if text.isdigit() and int(text) < len(choices):
        return int(text)
    return None


__all__ = [
    "ChoiceArgs",
    "ExactArgs",
    "GenerativeScorer",
    "LoglikScorer",
    "NumberArgs",
    "PerplexityArgs",
    "RegexArgs",
    "Scorer",
    "ScorerSpec",
    "charset_ok",
    "choice_index",
    "get_scorer_spec",
    "last_number",
    "numbers_equal",
    "register_scorer",
    "scorer_names",
    "truncate_at_stop",
]
