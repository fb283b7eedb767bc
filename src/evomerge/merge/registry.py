"""Registry of merge operators: each kernel declares its name, space and parameters exactly once.

A kernel is registered with the `@operator(...)` decorator. Two calling conventions exist
(see docs/ARCHITECTURE.md, "evomerge.merge"):

- ``space="delta"``:   ``kernel(base, deltas, *, generator, **params)`` where ``deltas`` is stacked
  ``[N, *shape]`` with ``deltas[i] = model_i - base``; returns the merged weights.
- ``space="weights"``: ``kernel(tensors, base, *, generator, **params)`` where ``tensors`` is stacked
  ``[N, *shape]`` raw weights and ``base`` is a tensor or ``None``; returns the merged weights.

Kernels must not modify their inputs (the in-memory merger keeps task vectors resident across trials).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    import torch

Space = Literal["delta", "weights"]
Kernel = Callable[..., "torch.Tensor"]


@dataclass(frozen=True)
class ParamSpec:
    """One operator parameter.

    ``per_model`` parameters arrive at the kernel as a list with one value per non-base model; global
    ones as a scalar. ``low``/``high`` bound valid numeric values (inclusive). ``search`` optionally
    narrows the box an optimiser should explore when the valid range is unbounded (e.g. weights).
    A ``default`` of ``None`` marks the parameter as required; a ``bool`` default makes it a flag.
    """

    name: str
    default: float | bool | None
    per_model: bool = False
    low: float = -math.inf
    high: float = math.inf
    search: tuple[float, float] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        """True when a recipe must give a value (mergekit has no default either)."""
        return self.default is None

    @property
    def is_flag(self) -> bool:
        """True for boolean switches such as ``normalize``."""
        return isinstance(self.default, bool)

    def search_bounds(self) -> tuple[float, float]:
        """The finite box a search should sample this parameter from."""
        low, high = self.search if self.search is not None else (self.low, self.high)
        if self.is_flag or not (math.isfinite(low) and math.isfinite(high)):
            raise ConfigError(f"Parameter '{self.name}' has no finite search range; give one explicitly.")
        return low, high


@dataclass(frozen=True)
class OperatorSpec:
    """A registered merge operator: its kernel plus everything a planner or a search needs to know."""

    name: str
    kernel: Kernel
    space: Space
    params: tuple[ParamSpec, ...]
    needs_base: bool
    is_random: bool
    doc: str
    single_input: bool = False  # merges exactly one model per tensor (into the base, if it has one)

    def param(self, name: str) -> ParamSpec:
        """The spec of parameter `name` (ConfigError if this operator has none)."""
        for spec in self.params:
            if spec.name == name:
                return spec
        names = self.param_names()
        raise ConfigError(
            f"Operator '{self.name}' has no parameter '{name}'{_suggestion(name, names)}; "
            f"its parameters are: {', '.join(names) or 'none'}."
        )

    def param_names(self) -> list[str]:
        """Names of the parameters, in declaration order."""
        return [spec.name for spec in self.params]


_REGISTRY: dict[str, OperatorSpec] = {}


def operator(
    name: str,
    *,
    space: Space,
    params: Sequence[ParamSpec] = (),
    needs_base: bool = True,
    is_random: bool = False,
    single_input: bool = False,
) -> Callable[[Kernel], Kernel]:
    """Register the decorated kernel under `name`; the kernel itself is returned unchanged.

    Raises ``ValueError`` on a duplicate name: that is a programming error, not a user error.
    """
    if space not in ("delta", "weights"):
        raise ValueError(f"Operator space must be 'delta' or 'weights', got {space!r}.")
    if space == "delta" and not needs_base:
        raise ValueError(f"Operator '{name}' works on task vectors, so it needs a base model.")

    def register(kernel: Kernel) -> Kernel:
        if name in _REGISTRY:
            raise ValueError(f"Merge operator '{name}' is already registered.")
        _REGISTRY[name] = OperatorSpec(
            name=name,
            kernel=kernel,
            space=space,
            params=tuple(params),
            needs_base=needs_base,
            is_random=is_random,
            doc=(kernel.__doc__ or "").strip(),
            single_input=single_input,
        )
        return kernel

    return register


def _ensure_builtins() -> None:
    # Importing the ops package runs its @operator decorators; done lazily so that
    # `registry` itself has no import cycle with the kernels that import it.
    import evomerge.merge.ops  # noqa: F401


def _suggestion(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def get_operator(name: str) -> OperatorSpec:
    """The operator registered as `name`; ConfigError naming the closest match otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"Unknown merge method '{name}'{_suggestion(name, list(_REGISTRY))}; "
            f"available: {', '.join(sorted(_REGISTRY))}."
        ) from None


def operator_names() -> list[str]:
    """Sorted names of every registered operator."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _check_value(op: str, spec: ParamSpec, value: Any) -> None:
    where = f"Parameter '{spec.name}' of '{op}'"
    if spec.is_flag:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    if not (spec.low <= value <= spec.high):  # also rejects NaN
        raise ConfigError(f"{where} must lie in [{spec.low:g}, {spec.high:g}], got {value!r}.")


def check_params(
    op_name: str, specs: Sequence[ParamSpec], params: Mapping[str, Any], *, num_models: int | None = None
) -> dict[str, Any]:
    """Check parameter values against `specs` and fill in defaults.

    Per-model parameters accept a scalar (broadcast to every model when `num_models` is given) or a
    list of length `num_models`. Returns a new dict with every parameter present; raises ConfigError
    naming the offending parameter and its allowed range. Kernels whose parameters cannot be Python
    keywords (``lambda``) call this themselves.
    """
    known = [p.name for p in specs]
    for name in params:
        if name not in known:
            raise ConfigError(
                f"Operator '{op_name}' has no parameter '{name}'{_suggestion(name, known)}; "
                f"its parameters are: {', '.join(known) or 'none'}."
            )
    resolved: dict[str, Any] = {}
    for p in specs:
        value = params.get(p.name, p.default)
        if value is None:
            raise ConfigError(f"Operator '{op_name}' needs a value for parameter '{p.name}'.")
        if p.per_model and isinstance(value, (list, tuple)):
            if num_models is not None and len(value) != num_models:
                raise ConfigError(
                    f"Parameter '{p.name}' of '{op_name}' has {len(value)} values for {num_models} models."
                )
            for item in value:
                _check_value(op_name, p, item)
            value = list(value)
        else:
            _check_value(op_name, p, value)
            if p.per_model and num_models is not None:
                value = [value] * num_models
        resolved[p.name] = value
    return resolved
