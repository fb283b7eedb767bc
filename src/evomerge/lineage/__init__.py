"""Lineage: ancestry across runs, release packets and their cards (see docs/ARCHITECTURE.md).

Everything here reads runs, which pulls in the search and transformers, so it is loaded on first use.
The card renderer every merge shares is `evomerge.merge.card`.
"""

__all__ = ["export_candidate", "lineage"]


def __getattr__(name: str):
    if name == "lineage":
        from evomerge.lineage.dag import lineage

        return lineage
    if name == "export_candidate":
        from evomerge.lineage.packet import export_candidate

        return export_candidate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
