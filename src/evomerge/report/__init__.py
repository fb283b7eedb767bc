"""The evolution report: plots of a run and one self-contained HTML file (see docs/REPORT.md)."""

from evomerge.report.html import ReportResult, write_report

__all__ = ["ReportResult", "write_report"]
