"""Data-flow-space merging: layer paths through several models, a KV-cache-correct path model, and
export of a path as an ordinary checkpoint with its scales folded into the weights."""

from evomerge.flow.export import export_path, fold_factors, folded_tensors
from evomerge.flow.model import (
    SHARED_CONFIG_FIELDS,
    SUPPORTED_MODEL_TYPES,
    PathModel,
    check_path_sources,
    path_config,
)
from evomerge.flow.spec import (
    MAX_PATH_STEPS,
    FigureStep,
    FlowGenome,
    PathSpec,
    initial_genome,
    path_figure_data,
    path_from_genome,
    slot_layout,
)

__all__ = [
    "MAX_PATH_STEPS",
    "SHARED_CONFIG_FIELDS",
    "SUPPORTED_MODEL_TYPES",
    "FigureStep",
    "FlowGenome",
    "PathModel",
    "PathSpec",
    "check_path_sources",
    "export_path",
    "fold_factors",
    "folded_tensors",
    "initial_genome",
    "path_config",
    "path_figure_data",
    "path_from_genome",
    "slot_layout",
]
