"""Deferred imports, so that reading and validating a config never pays for torch, transformers or optuna.

`evomerge evolve bad.yaml` must say what is wrong within a second; importing torch alone takes longer
than that on a loaded machine. Packages whose public names live in heavy modules export them through
`lazy_exports` (PEP 562: the module is imported on first access to the name), and the merge kernels
reach torch through `lazy_module`, so registering the operators (whose parameters a config is checked
against) imports no torch until a kernel runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for a package whose public `name` lives in the submodule `exports[name]`."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


class LazyModule:
    """A stand-in for a module that imports it on the first attribute access (then forwards to it)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        # Only called for names the instance lacks, i.e. the module's attributes.
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attribute)


def lazy_module(name: str) -> Any:
    """`name` imported on first use (typed as Any: call sites use it exactly as the module)."""
    return LazyModule(name)
