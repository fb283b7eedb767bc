"""Lineage: ancestry across runs, release packets and model cards (see docs/ARCHITECTURE.md).

`card` is imported eagerly (the merge command needs only it); the rest reads runs, which pulls in the
search and transformers, so it is loaded on first use to keep `evomerge merge` start-up short.
"""

from evomerge.lineage.card import CardInfo, CardScore, render_model_card

__all__ = ["CardInfo", "CardScore", "export_candidate", "lineage", "render_model_card"]


def __getattr__(name: str):
    if name == "lineage":
        from evomerge.lineage.dag import lineage

        return lineage
    if name == "export_candidate":
        from evomerge.lineage.packet import export_candidate

        return export_candidate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
