"""Merge operators, recipes, the plan, the streaming executor and the in-memory merger (see docs/ARCHITECTURE.md).

Names are imported on first use (`evomerge.lazy`): validating a config must not import torch or optuna.
"""

from typing import TYPE_CHECKING

from evomerge.lazy import lazy_exports

if TYPE_CHECKING:
    from evomerge.merge.inmemory import InMemoryMerger, checkpoint_named_tensors
    from evomerge.merge.plan import NonFiniteWeightsError
    from evomerge.merge.recipe import Recipe, load_recipe, parse_recipe
    from evomerge.merge.registry import OperatorSpec, ParamSpec, get_operator, operator_names
    from evomerge.merge.stream import MergeResult, StreamingMerge, run_merge

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "InMemoryMerger": "inmemory",
        "checkpoint_named_tensors": "inmemory",
        "NonFiniteWeightsError": "plan",
        "Recipe": "recipe",
        "load_recipe": "recipe",
        "parse_recipe": "recipe",
        "OperatorSpec": "registry",
        "ParamSpec": "registry",
        "get_operator": "registry",
        "operator_names": "registry",
        "MergeResult": "stream",
        "StreamingMerge": "stream",
        "run_merge": "stream",
    },
)

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
