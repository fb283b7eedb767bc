"""Merge operators, recipes, the plan, the streaming executor and the in-memory merger (see docs/ARCHITECTURE.md)."""

from evomerge.merge.inmemory import InMemoryMerger, checkpoint_named_tensors
from evomerge.merge.plan import NonFiniteWeightsError
from evomerge.merge.recipe import Recipe, load_recipe, parse_recipe
from evomerge.merge.registry import OperatorSpec, ParamSpec, get_operator, operator_names
from evomerge.merge.stream import MergeResult, StreamingMerge, run_merge

__all__ = [
    "InMemoryMerger",
    "MergeResult",
    "NonFiniteWeightsError",
    "OperatorSpec",
    "ParamSpec",
    "Recipe",
    "StreamingMerge",
    "checkpoint_named_tensors",
    "get_operator",
    "load_recipe",
    "operator_names",
    "parse_recipe",
    "run_merge",
]
