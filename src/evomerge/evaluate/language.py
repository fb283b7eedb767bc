"""Language identification of a whole response: the paper's check, as an optional extra.

The paper counted a Japanese answer only if a language identifier found the *whole response* in Japanese.
`response_charset` is the deterministic stand-in (a script check); `response_language: ja` runs a real
identifier, py3langid (langid.py's model of 142 languages, shipped inside the wheel: nothing is downloaded).
The paper used fastText's identifier, whose model is a separate download, so the decision on a borderline
response can differ; the rule (the top-scoring language of the whole response must be the asked one) is
the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from evomerge.errors import TaskError

INSTALL_HINT = "pip install 'evomerge[langid]'"


@cache
def _identifier() -> Any:
    # Built once per process: loading the model takes ~0.3 s, classifying a response ~0.1 ms.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> tuple[str, ...]:
    """The ISO 639-1 codes the identifier can return."""
    return tuple(_identifier().nb_classes)


def language_check(language: str | None, path: Path) -> Callable[[str], bool] | None:
    """A predicate that is True when the identifier's top language for a response is `language` (None
    when no language is asked).

    Raises TaskError naming the task file when the extra is not installed or the code is unknown.
    """
    if language is None:
        return None
    try:
        import py3langid  # noqa: F401  (only to tell a missing extra from an unknown code)
    except ImportError:
        raise TaskError(
            f"task file {path}: field 'response_language' needs the optional language identifier ({INSTALL_HINT})"
        ) from None
    if language not in known_languages():
        raise TaskError(
            f"task file {path}: field 'response_language' is '{language}', which is not an ISO 639-1 code the "
            f"language identifier knows ({', '.join(known_languages())})"
        )
    identifier = _identifier()

    def in_language(response: str) -> bool:
        return bool(response.strip()) and identifier.classify(response)[0] == language

    return in_language
