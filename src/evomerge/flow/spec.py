"""Layer paths for data-flow-space (DFS) merging and their genome encoding.

Sakana's DFS lays out the M decoder layers of the sources in order (model A's layers, then model B's, ...)
and repeats that sequence r times, giving T = M * r slots. An indicator over the slots says which slots the
path visits, in slot order, and a scaling matrix W gives one scalar per transition "from source layer i to
source layer j", multiplying the hidden state that enters layer j.

Convention for the first step (the paper leaves it open): the scaling matrix here has **M + 1 rows**.
Rows 0..M-1 are the paper's W (``scales[i, j]``: from global layer i to global layer j); the extra
last row, ``scales[M, j]``, scales the token embeddings when they enter the path's first layer j.
Global layer indices count layers across sources: source s, layer l has index ``offset(s) + l``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from evomerge.errors import ConfigError

#: Longest path a `PathSpec` accepts by default: the paper's largest layout has T = 192 slots, and a path
#: far longer than its slot layout is a bug in the caller rather than an experiment.
MAX_PATH_STEPS = 1024

#: Indicator gene values used by `initial_genome`; any gene > 0 means "on".
GENE_ON = 1.0
GENE_OFF = -1.0


@dataclass(frozen=True)
class PathSpec:
    """A validated layer path through several source models.

    `steps[k] = (source, layer)` is the k-th layer the hidden state passes through and `scales[k]` the
    scalar multiplying the hidden state entering that step (the W entry of its transition).
    """

    layers_per_source: tuple[int, ...]
    steps: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    source_names: tuple[str, ...] = ()
    max_steps: int = field(default=MAX_PATH_STEPS, compare=False)

    def __post_init__(self) -> None:
        # Normalise list inputs to tuples so specs hash, compare and serialise the same way.
        object.__setattr__(self, "layers_per_source", tuple(int(n) for n in self.layers_per_source))
        object.__setattr__(self, "steps", tuple((int(s), int(l)) for s, l in self.steps))
        object.__setattr__(self, "scales", tuple(float(w) for w in self.scales))
        object.__setattr__(self, "source_names", tuple(str(n) for n in self.source_names))
        _validate_spec(self)

    @property
    def num_sources(self) -> int:
        """Number of source models."""
        return len(self.layers_per_source)

    @property
    def names(self) -> tuple[str, ...]:
        """Display names of the sources (``source_0``, ... when none were given)."""
        return self.source_names or tuple(f"source_{s}" for s in range(self.num_sources))

    def __len__(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists, ints, floats); `PathSpec.from_dict` inverts it."""
        return {
            "layers_per_source": list(self.layers_per_source),
            "steps": [list(step) for step in self.steps],
            "scales": list(self.scales),
            "source_names": list(self.source_names),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PathSpec:
        """Rebuild a spec from `to_dict` output; malformed input raises `ConfigError`."""
        try:
            return cls(
                layers_per_source=tuple(data["layers_per_source"]),
                steps=tuple(tuple(step) for step in data["steps"]),
                scales=tuple(data["scales"]),
                source_names=tuple(data.get("source_names", ())),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"path spec is malformed: {error!r}.") from None


def _validate_spec(spec: PathSpec) -> None:
    """Raise `ConfigError` (one sentence naming the field) for any inconsistency in `spec`."""
    if not spec.layers_per_source or any(n < 1 for n in spec.layers_per_source):
        raise ConfigError(
            f"path spec field 'layers_per_source' must list at least one source with >= 1 layer, "
            f"got {list(spec.layers_per_source)}."
        )
    if spec.source_names and len(spec.source_names) != spec.num_sources:
        raise ConfigError(
            f"path spec field 'source_names' has {len(spec.source_names)} names for {spec.num_sources} sources."
        )
    if not spec.steps:
        raise ConfigError("path spec field 'steps' is empty: a path needs at least one layer.")
    if len(spec.steps) > spec.max_steps:
        raise ConfigError(
            f"path spec field 'steps' has {len(spec.steps)} steps, more than the limit of {spec.max_steps}."
        )
    if len(spec.scales) != len(spec.steps):
        raise ConfigError(
            f"path spec field 'scales' has {len(spec.scales)} values for {len(spec.steps)} steps."
        )
    for k, (source, layer) in enumerate(spec.steps):
        if not 0 <= source < spec.num_sources:
            raise ConfigError(
                f"path spec field 'steps[{k}]' names source {source}, not in 0..{spec.num_sources - 1}."
            )
        if not 0 <= layer < spec.layers_per_source[source]:
            raise ConfigError(
                f"path spec field 'steps[{k}]' names layer {layer} of source {source}, "
                f"which has {spec.layers_per_source[source]} layers."
            )
    for k, scale in enumerate(spec.scales):
        if not math.isfinite(scale):
            raise ConfigError(f"path spec field 'scales[{k}]' is {scale}, not a finite number.")


class FlowGenome(NamedTuple):
    """The DFS genome: an indicator over the T = M * repeats slots and the (M + 1) x M scaling matrix."""

    indicator: np.ndarray
    scales: np.ndarray


def slot_layout(layers_per_source: Sequence[int], repeats: int) -> list[tuple[int, int]]:
    """The (source, layer) in each of the T slots: all sources' layers in order, repeated `repeats` times."""
    if repeats < 1:
        raise ConfigError(f"DFS field 'repeats' must be >= 1, got {repeats}.")
    if not layers_per_source or any(n < 1 for n in layers_per_source):
        raise ConfigError(
            f"DFS field 'layers_per_source' must list at least one source with >= 1 layer, "
            f"got {list(layers_per_source)}."
        )
    one_pass = [(s, l) for s, n in enumerate(layers_per_source) for l in range(n)]
    return one_pass * repeats


def initial_genome(layers_per_source: Sequence[int], repeats: int) -> FlowGenome:
    """The paper's starting point: model A's layers on once (first repeat), every other slot off, W = 1."""
    slots = slot_layout(layers_per_source, repeats)
    num_layers = sum(layers_per_source)
    indicator = np.full(len(slots), GENE_OFF)
    indicator[: layers_per_source[0]] = GENE_ON
    return FlowGenome(indicator=indicator, scales=np.ones((num_layers + 1, num_layers)))


def path_from_genome(
    indicator: np.ndarray,
    scales: np.ndarray,
    layers_per_source: Sequence[int],
    repeats: int,
    *,
    source_names: Sequence[str] = (),
    max_steps: int = MAX_PATH_STEPS,
) -> PathSpec:
    """Decode a DFS genome into a `PathSpec`.

    Slots whose indicator gene is > 0 are on the path, in slot order. The scale of step k is
    ``scales[from, to]`` with ``to`` the global index of the step's layer and ``from`` the global index of
    the previous step's layer, or M (the embedding row) for the first step.
    """
    slots = slot_layout(layers_per_source, repeats)
    num_layers = sum(layers_per_source)
    indicator = np.asarray(indicator, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    if indicator.shape != (len(slots),):
        raise ConfigError(
            f"DFS genome field 'indicator' has shape {indicator.shape}, expected ({len(slots)},) "
            f"for {num_layers} layers x {repeats} repeats."
        )
    if scales.shape != (num_layers + 1, num_layers):
        raise ConfigError(
            f"DFS genome field 'scales' has shape {scales.shape}, expected ({num_layers + 1}, {num_layers}) "
            f"(one row per source layer plus the embedding row)."
        )
    offsets = np.cumsum([0, *layers_per_source[:-1]])
    steps: list[tuple[int, int]] = []
    step_scales: list[float] = []
    previous = num_layers  # the embedding row
    for slot in np.flatnonzero(indicator > 0):
        source, layer = slots[slot]
        current = int(offsets[source]) + layer
        steps.append((source, layer))
        step_scales.append(float(scales[previous, current]))
        previous = current
    return PathSpec(
        layers_per_source=tuple(layers_per_source),
        steps=tuple(steps),
        scales=tuple(step_scales),
        source_names=tuple(source_names),
        max_steps=max_steps,
    )


@dataclass(frozen=True)
class FigureStep:
    """One step of a path as the report plots it."""

    step: int
    source_index: int
    source: str
    layer: int
    scale: float


def path_figure_data(spec: PathSpec) -> list[FigureStep]:
    """Per step: source name, layer and scale, in path order (plotting lives in `evomerge.report`)."""
    names = spec.names
    return [
        FigureStep(step=k, source_index=source, source=names[source], layer=layer, scale=scale)
        for k, ((source, layer), scale) in enumerate(zip(spec.steps, spec.scales))
    ]
