"""evomerge: evolutionary model merging with lineage."""

__version__ = "0.1.0"
