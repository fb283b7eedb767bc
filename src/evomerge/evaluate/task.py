"""Declarative evaluation tasks: the YAML schema, data loading, split checks and prompt rendering.

A task file is data, not code (the lm-evaluation-harness lesson). `load_task(path)` validates it and
its data completely up front, so a bad file fails in one sentence before any model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from evomerge.errors import TaskError
from evomerge.evaluate.data import Row, load_cached_dataset, read_rows
from evomerge.evaluate.images import TaskImage, load_image
from evomerge.evaluate.language import language_check
from evomerge.evaluate.scorers import (
    GenerativeScorer,
    LoglikScorer,
    Scorer,
    choice_index,
    compile_charset,
    get_scorer_spec,
    scorer_names,
)
from evomerge.validation import suggestion, validation_sentence

SPLITS: tuple[str, str] = ("search", "test")
#: A rendered prompt longer than this is refused at load: no model evomerge merges reads 200,000
#: characters of prompt, and tokenising and batching such rows is how an evaluation runs out of memory.
MAX_PROMPT_CHARACTERS = 200_000
Split = Literal["search", "test"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitFiles(_Strict):
    """One data file per split (paths relative to the task file)."""

    search: str
    test: str


class SplitColumn(_Strict):
    """One data file whose `split_field` column names each row's split."""

    path: str
    split_field: str
    search_value: str = "search"
    test_value: str = "test"


class CachedDataset(_Strict):
    """A `datasets` dataset, used only if it is already in the local cache (never downloaded)."""

    dataset: str
    config: str | None = None
    search_split: str = "train"
    test_split: str = "test"


def _data_kind(value: Any) -> str:
    """Pick the data layout by its distinguishing key, so errors talk about the layout meant."""
    # Anything else (None, a list, a string) falls to "files", whose validation then names the bad field.
    keys = value.keys() if isinstance(value, Mapping) else getattr(value, "__dict__", {}).keys()
    if "dataset" in keys:
        return "dataset"
    if "path" in keys or "split_field" in keys:
        return "split_field"
    return "files"


DataSpec = Annotated[
    Annotated[SplitFiles, Tag("files")]
    | Annotated[SplitColumn, Tag("split_field")]
    | Annotated[CachedDataset, Tag("dataset")],
    Discriminator(_data_kind),
]


class GenerationSpec(_Strict):
    """Greedy decoding limits: at most `max_new_tokens`, stopping early at EOS or any stop string."""

    max_new_tokens: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=list)


class TaskSpec(_Strict):
    """The validated content of a task YAML file (see docs/ARCHITECTURE.md for the schema)."""

    name: str = Field(min_length=1)
    description: str = ""  # free text, shown in reports and model cards
    data: DataSpec
    prompt: str
    answer_field: str
    fewshot: int = Field(0, ge=0)
    fewshot_separator: str = "\n"
    scorer: str
    scorer_args: dict[str, Any] = Field(default_factory=dict)
    answer_charset: str | None = None
    """Regex every non-space character of the *extracted answer* must match."""
    response_charset: str | None = None
    """Regex every non-space character of the *whole response* (up to the stop string) must match: the
    deterministic stand-in for the paper's language identification of the full answer."""
    response_language: str | None = None
    """ISO 639-1 code the whole response must be identified as (the paper's check; the `langid` extra)."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    image_field: str | None = None
    """Field holding each example's image (a path relative to its data file, or a base64 PNG; null for
    a text-only example): the task is then evaluated through the model's processor, and image examples
    are disjoint across splits by image pixels."""


def _read_yaml(path: Path) -> tuple[Any, bytes]:
    """The parsed YAML and the file's bytes (read once, so the fingerprint is of what was parsed)."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise TaskError(f"task file {path} cannot be read ({error})") from None
    try:
        return yaml.safe_load(text), raw
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TaskError(f"task file {path} is not valid YAML{where}") from None


def _prompt_fields(prompt: str, task_file: Path) -> list[str]:
    """Top-level field names used by the prompt template (e.g. "{q[0]}" uses "q")."""
    try:
        parsed = list(string.Formatter().parse(prompt))
    except ValueError as error:
        raise TaskError(
            f"task file {task_file}: field 'prompt' is not a valid format string ({error})"
        ) from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise TaskError(f"task file {task_file}: field 'prompt' must use named fields like {{question}}")
        root = re.split(r"[.\[]", name, maxsplit=1)[0]
        if root not in fields:
            fields.append(root)
    return fields


def _row_key(row: Row, fields: Sequence[str]) -> str:
    """Content hash of the prompt-relevant fields of a row (what makes two examples 'the same')."""
    payload = json.dumps(
        [row.get(field) for field in fields], sort_keys=True, default=str, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class Task:
    """A validated task: its spec, its rows per split, its scorer and a stable fingerprint."""

    def __init__(
        self,
        spec: TaskSpec,
        path: Path,
        splits: dict[str, list[Row]],
        fingerprint: str,
        data_files: Mapping[str, Path] | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self._splits = splits
        self._fingerprint = fingerprint
        # Image paths are relative to the data file a row came from (the task file for a dataset).
        self._data_files = dict(data_files or {split: path for split in SPLITS})
        self._images: dict[str, list[TaskImage]] = {}
        self.scorer: Scorer = _build_scorer(spec, path)
        self.charset: re.Pattern[str] | None = compile_charset(spec.answer_charset, "answer_charset", path)
        self.response_charset = compile_charset(spec.response_charset, "response_charset", path)
        self.response_language = language_check(spec.response_language, path)
        self._fields = _prompt_fields(spec.prompt, path)
        self._validate_rows()
        if spec.image_field is not None:
            # The images are part of what is evaluated: the same rows with other pictures are another task.
            digests = [image.digest if image else "" for split in SPLITS for image in self.images(split)]
            self._fingerprint = hashlib.sha256("\n".join([fingerprint, *digests]).encode()).hexdigest()

    @property
    def name(self) -> str:
        """The task's unique name."""
        return self.spec.name

    @property
    def has_images(self) -> bool:
        """True when every example carries an image (the task names an `image_field`)."""
        return self.spec.image_field is not None

    def images(self, split: str) -> list[TaskImage | None]:
        """The decoded images of `split`, in example order, None for a text-only example (decoded once,
        on first use: at load)."""
        split = check_split(split)
        field = self.spec.image_field
        if field is None:
            raise TaskError(f"task {self.name!r} has no image_field")
        if split not in self._images:
            self._images[split] = [
                None if row[field] is None
                else load_image(row[field], self._data_files[split], f"task file {self.path}: {split} example {number}")
                for number, row in enumerate(self._splits[split], start=1)
            ]
        return self._images[split]

    @property
    def is_generative(self) -> bool:
        """True for generation-based scorers, False for log-likelihood scorers."""
        return isinstance(self.scorer, GenerativeScorer)

    def examples(self, split: str) -> list[Row]:
        """The rows of `split` ("search" or "test"), in file order."""
        return self._splits[check_split(split)]

    def answers(self, split: str) -> list[Any]:
        """The reference answers of `split`, in example order."""
        return [row[self.spec.answer_field] for row in self.examples(split)]

    def prompts(self, split: str) -> list[str]:
        """The rendered prompts of `split`, few-shot examples (from the search split only) prepended."""
        return [self.render(split, index) for index in range(len(self.examples(split)))]

    def render(self, split: str, index: int) -> str:
        """Prompt of example `index` of `split` with `fewshot` solved search examples before it.

        Shots are a seeded sample of the search split (seed = task name, split, index), so prompts are
        stable across runs, differ between examples, and a search example never sees itself.
        """
        row = self.examples(split)[index]
        shots = self._fewshot_indices(split, index)
        pool = self._splits["search"]
        parts = [self._format(pool[i]) + str(pool[i][self.spec.answer_field]) for i in shots]
        return self.spec.fewshot_separator.join([*parts, self._format(row)])

    def _fewshot_indices(self, split: str, index: int) -> list[int]:
        k = self.spec.fewshot
        if k == 0:
            return []
        size = len(self._splits["search"])
        exclude = index if split == "search" else None
        candidates = size - (exclude is not None)
        rng = random.Random(f"{self.name}/{split}/{index}")
        picked = rng.sample(range(candidates), k)
        return [i + 1 if exclude is not None and i >= exclude else i for i in picked]

    def _format(self, row: Row) -> str:
        return self.spec.prompt.format(**row)

    def fingerprint(self) -> str:
        """sha256 of the task file bytes and the data bytes: identity for lineage and the result cache."""
        return self._fingerprint

    def _validate_rows(self) -> None:
        spec, path = self.spec, self.path
        for split in SPLITS:
            rows = self._splits[split]
            if not rows:
                raise TaskError(f"task file {path}: the {split} split has no examples")
            for number, row in enumerate(rows, start=1):
                needed = (spec.answer_field, *self._fields, *([spec.image_field] if spec.image_field else []))
                missing = [f for f in needed if f not in row]
                if missing:
                    raise TaskError(
                        f"task file {path}: {split} example {number} has no field {missing[0]!r} "
                        f"(fields: {', '.join(map(str, row))})"
                    )
                if isinstance(self.scorer, LoglikScorer) and self.scorer.mode == "choice":
                    _check_choices(
                        row, self.scorer.choices_field or "", spec.answer_field, path, split, number
                    )
        if spec.fewshot and spec.image_field is not None:
            raise TaskError(f"task file {path}: fewshot must be 0 for a task with an image_field (one image per prompt)")
        if spec.fewshot > len(self._splits["search"]) - 1:
            raise TaskError(
                f"task file {path}: fewshot={spec.fewshot} needs more than {len(self._splits['search'])} "
                "search examples (shots come from the search split only)"
            )
        self._check_disjoint()
        # Every row, not only the first: "{choices[3]}" fails only on the rows with fewer choices, and
        # would otherwise stop a search hours in.
        for split in SPLITS:
            for number, row in enumerate(self._splits[split], start=1):
                try:
                    rendered = self._format(row)
                except (KeyError, IndexError, AttributeError, ValueError, TypeError) as error:
                    raise TaskError(
                        f"task file {path}: field 'prompt' cannot be rendered for {split} example {number} ({error!r})"
                    ) from None
                if len(rendered) > MAX_PROMPT_CHARACTERS:
                    raise TaskError(
                        f"task file {path}: {split} example {number} renders to {len(rendered):,} characters, "
                        f"over the limit of {MAX_PROMPT_CHARACTERS:,}"
                    )

    def _check_disjoint(self) -> None:
        text_rows = self._splits
        if self.spec.image_field is not None:
            # An image seen while searching makes any question about it a search example.
            images = {split: self.images(split) for split in SPLITS}
            seen = {image.digest: number for number, image in enumerate(images["search"], start=1) if image}
            for number, image in enumerate(images["test"], start=1):
                if image and image.digest in seen:
                    raise TaskError(
                        f"task file {self.path}: test example {number} has the same image as search example "
                        f"{seen[image.digest]} (splits must be disjoint by image content)"
                    )
            text_rows = {
                split: [row for row, image in zip(self._splits[split], images[split], strict=True) if image is None]
                for split in SPLITS
            }
        fields = self._fields or [self.spec.answer_field]
        search = {_row_key(row, fields): row for row in text_rows["search"]}
        overlap = [row for row in text_rows["test"] if _row_key(row, fields) in search]
        if overlap:
            example = {field: overlap[0].get(field) for field in fields}
            raise TaskError(
                f"task file {self.path}: search and test splits overlap in {len(overlap)} example(s) "
                f"by prompt fields {fields}, e.g. {example}"
            )


def _check_choices(row: Row, field: str, answer_field: str, path: Path, split: str, number: int) -> None:
    """A choice example needs a non-empty list of choices and an answer naming one of them."""
    choices = row.get(field)
    if not isinstance(choices, list) or not choices:
        raise TaskError(
            f"task file {path}: {split} example {number} field {field!r} must be a non-empty list"
        )
    if choice_index(choices, row[answer_field]) is None:
        raise TaskError(
            f"task file {path}: {split} example {number} answer {row[answer_field]!r} is neither an index "
            f"into nor the text of one of its {field!r}"
        )


def _build_scorer(spec: TaskSpec, path: Path) -> Scorer:
    try:
        scorer_spec = get_scorer_spec(spec.scorer)
    except KeyError:
        hint = suggestion(spec.scorer, scorer_names(), "scorers")
        raise TaskError(f"task file {path}: unknown scorer {spec.scorer!r}{hint}") from None
    try:
        args = scorer_spec.args_model.model_validate(spec.scorer_args)
    except ValidationError as error:
        source = f"task file {path} (scorer {spec.scorer!r})"
        raise TaskError(
            validation_sentence(error, source, scorer_spec.args_model, prefix=("scorer_args",))
        ) from None
    try:
        return scorer_spec.build(args)
    except ValueError as error:  # a factory's own check of its arguments, naming the field
        raise TaskError(f"task file {path}: {error}") from None


def check_split(split: str) -> str:
    """Return `split` if it is "search" or "test"; otherwise raise TaskError."""
    if split not in SPLITS:
        raise TaskError(f"split must be 'search' or 'test', got {split!r}")
    return split


def _load_data(spec: TaskSpec, path: Path) -> tuple[dict[str, list[Row]], str, dict[str, Path]]:
    """Rows per split, a fingerprint of the data's bytes and the file each split was read from."""
    base = path.parent
    data = spec.data
    if isinstance(data, CachedDataset):
        return (*load_cached_dataset(data, path), {split: path for split in SPLITS})
    if isinstance(data, SplitFiles):
        files = {"search": base / data.search, "test": base / data.test}
        splits = {split: read_rows(file, path) for split, file in files.items()}
        digest = hashlib.sha256(b"".join(file.read_bytes() for file in files.values()))
        return splits, digest.hexdigest(), files
    # One file with a split column: rows whose split value is neither search nor test (say
    # "validation") are left out on purpose.
    file = base / data.path
    rows = read_rows(file, path)
    splits = {"search": [], "test": []}
    wanted = {data.search_value: "search", data.test_value: "test"}
    for number, row in enumerate(rows, start=1):
        if data.split_field not in row:
            raise TaskError(f"data file {file}: row {number} has no split field {data.split_field!r}")
        split = wanted.get(str(row[data.split_field]))
        if split is not None:
            splits[split].append(row)
    return splits, hashlib.sha256(file.read_bytes()).hexdigest(), {split: file for split in SPLITS}


def load_task(path: str | os.PathLike[str]) -> Task:
    """Load and fully validate a task YAML file and its data; every problem raises `TaskError`."""
    path = Path(path)
    raw, task_bytes = _read_yaml(path)
    if not isinstance(raw, dict):
        raise TaskError(f"task file {path} must be a YAML mapping of keys like name, data, prompt")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as error:
        raise TaskError(validation_sentence(error, f"task file {path}", TaskSpec)) from None
    splits, data_fingerprint, data_files = _load_data(spec, path)
    fingerprint = hashlib.sha256(task_bytes + data_fingerprint.encode()).hexdigest()
    return Task(spec, path, splits, fingerprint, data_files)


__all__ = [
    "SPLITS",
    "CachedDataset",
    "GenerationSpec",
    "SplitColumn",
    "SplitFiles",
    "Task",
    "TaskSpec",
    "check_split",
    "load_task",
]
