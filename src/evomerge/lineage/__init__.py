"""Lineage: run evidence, ancestry across runs, release packets and model cards (see docs/ARCHITECTURE.md)."""

from evomerge.lineage.card import CardInfo, CardScore, render_model_card
from evomerge.lineage.dag import lineage
from evomerge.lineage.packet import export_candidate

__all__ = ["CardInfo", "CardScore", "export_candidate", "lineage", "render_model_card"]
