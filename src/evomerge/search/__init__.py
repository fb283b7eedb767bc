"""Evolutionary search over merge recipes and layer paths, and the run store (see docs/ARCHITECTURE.md).

The flow that runs a search end to end is `evomerge.pipelines.evolve`.

Names are imported on first use (`evomerge.lazy`): validating a config must not import torch or optuna.
"""

from typing import TYPE_CHECKING

from evomerge.lazy import lazy_exports

if TYPE_CHECKING:
    from evomerge.search.config import EvolveConfig, load_evolve_config, parse_evolve_config
    from evomerge.search.store import RunStore, TrialRecord, find_trial, load_run, recipe_of

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "EvolveConfig": "config",
        "load_evolve_config": "config",
        "parse_evolve_config": "config",
        "RunStore": "store",
        "TrialRecord": "store",
        "find_trial": "store",
        "load_run": "store",
        "recipe_of": "store",
    },
)

__all__ = [
    "EvolveConfig",
    "RunStore",
    "TrialRecord",
    "find_trial",
    "load_evolve_config",
    "load_run",
    "parse_evolve_config",
    "recipe_of",
]
