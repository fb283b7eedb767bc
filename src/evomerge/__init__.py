"""evomerge: evolutionary model merging with lineage.

`evomerge.evolve` is `evomerge.pipelines.evolve`, imported on first use: `import evomerge` (for
`__version__`) stays free of torch and transformers.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "evolve"]


def __getattr__(name: str):
    if name == "evolve":
        from evomerge.pipelines import evolve

        return evolve
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
