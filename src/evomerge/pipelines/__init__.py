"""Flows on top of the library: `evolve` (search, selection, test scoring) and the `demo` (see docs/ARCHITECTURE.md).

They call the search, then lineage and report; nothing below imports them.
"""

from evomerge.pipelines.evolve import EvolveOutcome, evolve

__all__ = ["EvolveOutcome", "evolve"]
