"""Evolutionary search over merge recipes and layer paths, and the run store (see docs/ARCHITECTURE.md).

The flow that runs a search end to end is `evomerge.pipelines.evolve`.
"""

from evomerge.search.config import EvolveConfig, load_evolve_config, parse_evolve_config
from evomerge.search.store import RunStore, TrialRecord, find_trial, load_run, recipe_of

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
