"""Parameter schedules with mergekit semantics: scalars, gradients and ``{filter, value}`` rules.

A value in a recipe is one of

- a scalar (number or bool): used for every tensor;
- a *gradient*, a list of numbers ``[v_0, ..., v_{m-1}]``: interpolated at the tensor's position
  ``t`` in [0, 1] as ``s = t * (m - 1)``, ``v = (1 - frac(s)) * v_floor(s) + frac(s) * v_{floor(s)+1}``;
  a list of bools picks ``v_{int(s)}`` instead of interpolating;
- a list of rules ``[{filter: str, value: ...}, ...]`` (a single rule mapping is allowed): the first rule
  whose ``filter`` is a substring of the tensor name wins; a rule without a filter (or ``"*"``) matches
  every tensor; its value may itself be a scalar or a gradient.

``t`` comes from `layer_position`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.errors import ConfigError

Scalar = float | int | bool
ParamValue = Scalar | Sequence[Scalar] | Mapping[str, Any] | Sequence[Mapping[str, Any]]


def layer_position(layer_index: int | None, num_layers: int) -> float:
    """The gradient position ``t`` mergekit uses for a tensor.

    For a tensor of decoder layer ``i`` of ``n``: ``t = i / (n - 1)``, and ``t = 1`` when ``n == 1``
    (mergekit's planner, per output slice). For tensors outside the layers (``layer_index is None``:
    embeddings, the final norm, ``lm_head``) mergekit plans with the module's reader at ``t = 0``, so a
    gradient contributes its *first* value there, also for the post-layer tensors.
    """
    if layer_index is None:
        return 0.0
    if not 0 <= layer_index < num_layers:
        raise ValueError(f"Layer index {layer_index} is outside a model with {num_layers} layers.")
    return layer_index / (num_layers - 1) if num_layers > 1 else 1.0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float))


def _gradient(values: Sequence[Scalar], t: float) -> Scalar:
    scaled = t * (len(values) - 1)
    low = int(scaled)
    if any(isinstance(v, bool) for v in values):
        return values[low]  # booleans select rather than interpolate
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def resolve_param(value: ParamValue, tensor_name: str, t: float) -> Scalar | None:
    """The scalar that `value` takes for tensor `tensor_name` at gradient position `t` in [0, 1].

    Returns ``None`` when no ``{filter, value}`` rule matches (or the list is empty), so the caller
    can fall back to a lower-precedence setting, as mergekit does. Raises ConfigError for a value of
    another shape.
    """
    if not 0 <= t <= 1:
        raise ValueError(f"Gradient position t must lie in [0, 1], got {t}.")
    if _is_scalar(value):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(
            f"Parameter value {value!r} for tensor '{tensor_name}' is not a number, list or rule."
        )
    if not value:
        return None
    if all(_is_scalar(v) for v in value):
        return _gradient(value, t)
    for rule in value:
        if not isinstance(rule, Mapping) or "value" not in rule or not set(rule) <= {"filter", "value"}:
            raise ConfigError(
                f"Parameter rule {rule!r} for tensor '{tensor_name}' must be a mapping with 'value' "
                "and an optional 'filter'."
            )
        pattern = rule.get("filter")
        if pattern is None or pattern == "*" or pattern in tensor_name:
            inner = rule["value"]
            if not (_is_scalar(inner) or (isinstance(inner, list) and inner and all(map(_is_scalar, inner)))):
                raise ConfigError(
                    f"Value of the rule {rule!r} for tensor '{tensor_name}' must be a number or a gradient."
                )
            return resolve_param(inner, tensor_name, t)
    return None
