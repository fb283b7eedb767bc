"""Turn a pydantic `ValidationError` into one sentence naming the file and the field.

Recipes, evolve configs and task files all report their mistakes through `validation_sentence`, so a
user sees the same wording (`unknown key ...; did you mean ...?`, `missing required field ...`, `field
... is invalid: ...`) whichever file they got wrong.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Tag, ValidationError
from pydantic_core import ErrorDetails

_VALIDATOR_LOCATIONS = ("function-", "list[", "union[", "tuple[", "dict[")
_TYPE_LOCATIONS = {"bool", "float", "int", "str"}
# Inputs shown after the message: short scalars say what was written; containers would drown the sentence.
_SHOWN_INPUTS = (str, int, float, bool, type(None))
_MAX_SHOWN_INPUT = 40


def suggestion(word: str, options: Iterable[str], noun: str = "keys") -> str:
    """`; did you mean 'x'?` for the nearest of `options`, else `; valid <noun> are a, b, c`."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid {noun} are {', '.join(options)}"


def validation_sentence(
    error: ValidationError, source: str, model: type[BaseModel], *, prefix: tuple[str, ...] = ()
) -> str:
    """`source: field 'models[1].parameters' is invalid: ...` or an unknown key with the nearest valid one.

    `prefix` is where the validated mapping sits inside the file (e.g. `("scorer_args",)`), so the field
    is named as the user wrote it.
    """
    first = _first_error(error)
    unknown = first["type"] == "extra_forbidden"
    where, fields = _walk(model, first["loc"][:-1] if unknown else first["loc"])
    if unknown:
        key = str(first["loc"][-1])
        return f"{source}: unknown key '{_join((*where, key), prefix)}'{suggestion(key, fields)}"
    field = _join(where, prefix)
    if first["type"] == "missing":
        return f"{source}: missing required field '{field}'"
    message = first["msg"].removeprefix("Value error, ")
    shown = first.get("input")
    if isinstance(shown, _SHOWN_INPUTS) and len(repr(shown)) <= _MAX_SHOWN_INPUT and repr(shown) not in message:
        message += f" (got {shown!r})"
    return f"{source}: field '{field}' is invalid: {message}"


def _first_error(error: ValidationError) -> ErrorDetails:
    """The most useful error: an unknown key first, since a misspelt key also causes a 'missing' one."""
    errors = error.errors()
    return next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])


def _join(parts: Iterable[str], prefix: tuple[str, ...]) -> str:
    """`models[0].parameters` from `("models", "[0]", "parameters")`, after the prefix's parts."""
    text = ""
    for part in (*prefix, *parts):
        text += part if part.startswith("[") or not text else f".{part}"
    return text or "(top level)"


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """The parts of `loc` the user wrote, and the field names valid where `loc` ends.

    pydantic inserts names the user never wrote into locations: validator and union-member names, and
    the tag of a discriminated union's member; they are dropped here. Following the models along the
    location is what tells a tag (`data.files`) from a field of the same name (`data.dataset.dataset`).
    """
    parts: list[str] = []
    current: Any = model
    tags: dict[str, type[BaseModel]] = {}
    for item in loc:
        text = str(item)
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif text in tags:
            current, tags = tags[text], {}
        elif text.startswith(_VALIDATOR_LOCATIONS) or text in _TYPE_LOCATIONS:
            continue
        else:
            parts.append(text)
            field = _model_fields(current).get(text)
            current, tags = _nested(field.annotation) if field is not None else (None, {})
    return parts, list(_model_fields(current))


def _model_fields(current: Any) -> dict[str, Any]:
    return current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, dict[str, type[BaseModel]]]:
    """The model inside a field's annotation (through list[X] / X | None), and its union members by tag."""
    found: type[BaseModel] | None = None
    tags: dict[str, type[BaseModel]] = {}
    pending = [annotation]
    while pending:
        current = pending.pop()
        if isinstance(current, type) and issubclass(current, BaseModel):
            found = found or current
            continue
        args = typing.get_args(current)
        if typing.get_origin(current) is typing.Annotated:
            tag = next((m.tag for m in current.__metadata__ if isinstance(m, Tag)), None)
            if tag is not None and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                tags[tag] = args[0]
            args = args[:1]
        pending.extend(reversed(args))
    return found, tags
