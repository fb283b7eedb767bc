"""Evolutionary search over merge recipes and layer paths (see docs/ARCHITECTURE.md)."""

from evomerge.search.config import EvolveConfig, load_evolve_config, parse_evolve_config
from evomerge.search.evolve import EvolveOutcome, evolve
from evomerge.search.run import load_run

__all__ = ["EvolveConfig", "EvolveOutcome", "evolve", "load_evolve_config", "load_run", "parse_evolve_config"]
