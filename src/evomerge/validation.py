"""Turn a pydantic `ValidationError` into one sentence naming the file and the field."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

_VALIDATOR_LOCATIONS = ("function-", "list[", "union[", "tuple[", "dict[")
_TYPE_LOCATIONS = {"bool", "float", "int", "str"}


def _describe_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith(_VALIDATOR_LOCATIONS) or item in _TYPE_LOCATIONS:
            # pydantic inserts validator and union-member names into locations; users never wrote them.
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def validation_sentence(error: ValidationError, source: str, model: type[BaseModel]) -> str:
    """`source: field 'models[1].parameters' is invalid: ...` or an unknown key with the nearest valid one."""
    first = error.errors()[0]
    where = _describe_location(first["loc"])
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        valid = _fields_at(model, first["loc"][:-1])
        hint = difflib.get_close_matches(key, valid, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else f"; valid keys are {', '.join(sorted(valid))}"
        return f"{source}: unknown key '{where}'{suggestion}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{source}: field '{where}' is invalid: {message}"


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model that an error location points into."""
    current: Any = model
    for item in loc:
        if isinstance(item, int) or not isinstance(current, type) or not issubclass(current, BaseModel):
            continue
        field = current.model_fields.get(str(item))
        if field is None:
            break
        annotation = field.annotation
        # Unwrap list[X] / X | None to reach the nested model.
        for arg in getattr(annotation, "__args__", ()) or ():
            inner = getattr(arg, "__args__", (arg,))
            for candidate in inner:
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    annotation = candidate
        current = annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []
