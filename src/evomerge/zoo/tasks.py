"""Synthetic skills of the zoo: problem generators, held-out problem pools and task files.

Numbers can be written in two synthetic languages that share the arithmetic but not the digits
(language 1 uses ``0-9``, language 2 uses ``a-j``). Tasks:

- ``add``        two-digit addition asked and answered in language 1 (the math specialist's skill);
- ``translate``  long numbers rewritten from language 1 into language 2 (the language specialist's skill);
- ``reverse``    reversing a word of letters ``k-z`` (an unrelated skill, the third specialist's);
- ``target``     an even mix of held-out ``add``, ``translate`` and ``reverse`` problems: the capability
                 of one model holding every skill, which no single specialist has;
- ``l2_add``     two-digit addition asked *and answered* in language 2 (the miniature of "Japanese math";
                 an answer in language-1 digits is rejected by ``answer_charset``). Kept as a measured
                 stretch task: at this scale no parent and no merge composes it (docs/ZOO.md).

Every evaluation problem is drawn from a pool that training never samples from. Addition problems are
keyed by the operand pair, independently of the language, so no model is trained on a pair that the
``add``, ``l2_add`` or ``target`` evaluation splits ask in either language.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

L1_DIGITS = "0123456789"
L2_DIGITS = "abcdefghij"
WORD_LETTERS = "klmnopqrstuvwxyz"
TRANSLATE_MARK = "#"
REVERSE_MARK = "~"
SPLITS = ("search", "test")
TARGET = "target"

#: Every character any zoo sequence can contain; the zoo tokenizer is built from it.
ZOO_CHARACTERS = L1_DIGITS + L2_DIGITS + WORD_LETTERS + "+=\n" + TRANSLATE_MARK + REVERSE_MARK

Problem = tuple[str, str]
"""A ``(question, answer)`` pair; the prompt shown to a model is ``question + "="``."""


def in_l2(number: int) -> str:
    """Write a non-negative integer with language-2 digits (``a`` = 0 ... ``j`` = 9)."""
    return "".join(L2_DIGITS[int(d)] for d in str(number))


def write_number(number: int, language: int) -> str:
    """Write a non-negative integer in language 1 or 2."""
    return str(number) if language == 1 else in_l2(number)


def addition(a: int, b: int, language: int, answer_language: int | None = None) -> Problem:
    """``a + b`` asked in ``language`` and answered in ``answer_language`` (default: the same one)."""
    answer = write_number(a + b, answer_language or language)
    return f"{write_number(a, language)}+{write_number(b, language)}", answer


def translation(number: int) -> Problem:
    """Rewrite a language-1 number in language 2."""
    return f"{TRANSLATE_MARK}{number}", in_l2(number)


def back_translation(number: int) -> Problem:
    """Rewrite a language-2 number in language 1."""
    return f"{TRANSLATE_MARK}{in_l2(number)}", str(number)


def reversal(word: str) -> Problem:
    """Reverse a word."""
    return f"{REVERSE_MARK}{word}", word[::-1]


def sequence(problem: Problem) -> tuple[str, str]:
    """Split a problem into the model's ``(prompt, completion)`` text; the completion ends with a newline."""
    question, answer = problem
    return f"{question}=", f"{answer}\n"


@dataclass(frozen=True)
class Family:
    """A problem family: draws a problem key, renders it, and knows which keys are held out for evaluation."""

    name: str
    draw_key: Callable[[random.Random], object]
    render: Callable[[object], Problem]
    held_out: frozenset = field(default_factory=frozenset)

    def sample(self, rng: random.Random) -> Problem:
        """A training problem: any key except the held-out evaluation keys (rejection sampling)."""
        while True:
            key = self.draw_key(rng)
            if key not in self.held_out:
                return self.render(key)


def _digits_range(low_digits: int, high_digits: int) -> Callable[[random.Random], int]:
    """Draw an integer with between ``low_digits`` and ``high_digits`` decimal digits (uniform in length)."""

    def draw(rng: random.Random) -> int:
        length = rng.randint(low_digits, high_digits)
        low = 0 if length == 1 else 10 ** (length - 1)
        return rng.randint(low, 10**length - 1)

    return draw


def _pair(first: Callable[[random.Random], int], second: Callable[[random.Random], int]):
    return lambda rng: (first(rng), second(rng))


def _word(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choice(WORD_LETTERS) for _ in range(rng.randint(low, high)))


@dataclass(frozen=True)
class TaskSpec:
    """One evaluated task: how it draws problem keys, renders them, and which held-out pool a key is in."""

    name: str
    skill: str
    draw_key: Callable[[random.Random], object]
    render: Callable[[object], Problem]
    pool_of: Callable[[object], tuple[str, object]]
    """``key -> (pool name, pool key)``: tasks sharing a pool never share an evaluation problem."""
    answer_charset: str | None
    max_new_tokens: int
    description: str


def _in_pool(pool: str) -> Callable[[object], tuple[str, object]]:
    return lambda key: (pool, key)


def task_specs() -> dict[str, TaskSpec]:
    """The zoo's evaluated tasks: one per specialist skill, the multi-skill ``target`` and ``l2_add``."""
    two_digit_pair = _pair(_digits_range(2, 2), _digits_range(2, 2))
    skills = {
        "add": TaskSpec(
            "add", "math", two_digit_pair, lambda k: addition(*k, language=1), _in_pool("addition"), "[0-9]", 4,
            "two-digit addition in language 1 (digits 0-9)",
        ),
        "translate": TaskSpec(
            "translate", "language", _digits_range(4, 6), translation, _in_pool("translate"), "[a-j]", 8,
            "rewrite a 4-6 digit language-1 number in language 2 (digits a-j)",
        ),
        "reverse": TaskSpec(
            "reverse", "strings", _word(5, 7), reversal, _in_pool("reverse"), "[k-z]", 8,
            "reverse a 5-7 letter word over k-z",
        ),
    }
    order = tuple(sorted(skills))

    def draw_mixed(rng: random.Random) -> tuple[str, object]:
        skill = order[rng.randrange(len(order))]
        return skill, skills[skill].draw_key(rng)

    return {
        **skills,
        # The capability the search is asked for: every hard skill in one model. Each item needs one
        # skill, the task needs all three, so no single specialist can score much above a third.
        TARGET: TaskSpec(
            TARGET, "math + language + strings", draw_mixed, lambda k: skills[k[0]].render(k[1]),
            lambda k: skills[k[0]].pool_of(k[1]), None, 8,
            "an even mix of the add, translate and reverse problems (held out from those tasks)",
        ),
        # The composition inside one answer (math asked and answered in language 2, the miniature of
        # "Japanese math"); no parent and no merge of this family solves it (see docs/ZOO.md).
        "l2_add": TaskSpec(
            "l2_add", "math x language", two_digit_pair, lambda k: addition(*k, language=2),
            _in_pool("addition"), "[a-j]", 4,
            "two-digit addition asked and answered in language 2; language-1 digits are rejected",
        ),
    }



def draw_splits(
    specs: Mapping[str, TaskSpec], sizes: Mapping[str, Mapping[str, int]], seed: int
) -> dict[str, dict[str, list[object]]]:
    """Draw disjoint evaluation keys per task and split; no problem repeats across tasks sharing a pool.

    Each (task, split) draws from its own seeded stream, so splits come from disjoint seeds as well as
    disjoint problems. Returns ``{task: {split: [key, ...]}}``.
    """
    used: set[tuple[str, object]] = set()
    keys: dict[str, dict[str, list[object]]] = {}
    for task_index, (name, spec) in enumerate(sorted(specs.items())):
        keys[name] = {}
        for split_index, split in enumerate(SPLITS):
            rng = random.Random(f"zoo-eval/{seed}/{task_index}/{split_index}")
            chosen: list[object] = []
            while len(chosen) < sizes[name][split]:
                key = spec.draw_key(rng)
                member = spec.pool_of(key)
                if member not in used:
                    used.add(member)
                    chosen.append(key)
            keys[name][split] = chosen
    return keys


def held_out_keys(
    specs: Mapping[str, TaskSpec], keys: Mapping[str, Mapping[str, list[object]]]
) -> dict[str, frozenset]:
    """All evaluation keys of each pool, which training samplers must avoid."""
    pools: dict[str, set[object]] = {}
    for name, splits in keys.items():
        for key in (k for ks in splits.values() for k in ks):
            pool, member = specs[name].pool_of(key)
            pools.setdefault(pool, set()).add(member)
    return {pool: frozenset(members) for pool, members in pools.items()}


def training_families(held_out: Mapping[str, frozenset]) -> dict[str, Family]:
    """The problem families training mixtures draw from, with evaluation problems excluded.

    ``*_easy`` families are the short, easy versions a broad base model learns; the others are the
    harder versions, which the base sees only rarely and a specialist is fine-tuned on.
    """
    digit = _digits_range(1, 1)
    two = _digits_range(2, 2)
    add_pool = held_out.get("addition", frozenset())
    return {
        # Easy arithmetic: single digits, and a two-digit number plus a single digit.
        "add_easy_l1": Family("add_easy_l1", _pair(_digits_range(1, 2), digit), lambda k: addition(*k, 1)),
        "add_easy_l2": Family("add_easy_l2", _pair(_digits_range(1, 2), digit), lambda k: addition(*k, 2)),
        "add_l1": Family("add_l1", _pair(two, two), lambda k: addition(*k, 1), add_pool),
        "add_l2": Family("add_l2", _pair(two, two), lambda k: addition(*k, 2), add_pool),
        "translate_easy": Family("translate_easy", _digits_range(1, 3), translation),
        "back_translate_easy": Family("back_translate_easy", _digits_range(1, 3), back_translation),
        "translate": Family("translate", _digits_range(4, 6), translation, held_out.get("translate", frozenset())),
        "reverse_easy": Family("reverse_easy", _word(2, 4), reversal),
        "reverse": Family("reverse", _word(5, 7), reversal, held_out.get("reverse", frozenset())),
    }


def write_task_files(
    out_dir: Path, specs: Mapping[str, TaskSpec], keys: Mapping[str, Mapping[str, list[object]]]
) -> dict[str, Path]:
    """Write one YAML + one JSONL per split for each task (schema of `evomerge.evaluate`); return YAML paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, spec in sorted(specs.items()):
        data = {}
        for split in SPLITS:
            jsonl = out_dir / f"{name}_{split}.jsonl"
            rows = (spec.render(key) for key in keys[name][split])
            _write_jsonl(jsonl, ({"question": q, "answer": a} for q, a in rows))
            data[split] = jsonl.name
        document = {
            "name": name,
            "description": spec.description,
            "data": data,
            "prompt": "{question}=",
            "answer_field": "answer",
            "fewshot": 0,
            "scorer": "exact",
            "scorer_args": {},
            "answer_charset": spec.answer_charset,
            "generation": {"max_new_tokens": spec.max_new_tokens, "stop": ["\n"]},
        }
        path = out_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        paths[name] = path
    return paths


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
