"""Errors a user can cause and fix. The CLI turns any of them into one sentence and exit code 2."""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of every user-caused error: bad recipe, incompatible models, missing files, bad task."""

    exit_code = 2


class ConfigError(EvomergeError):
    """A recipe, evolve config or task file that does not validate."""


class ModelError(EvomergeError):
    """A model reference that cannot be read: missing, corrupt, unsafe format, unsupported architecture."""


class CompatibilityError(EvomergeError):
    """Parents that cannot be merged together: different tensors, shapes or tokenizers."""


class TaskError(EvomergeError):
    """A task file or task data that cannot be used for evaluation."""


class ExportError(EvomergeError):
    """A model or packet that cannot be written (no space, a path escaping the output directory, ...)."""
