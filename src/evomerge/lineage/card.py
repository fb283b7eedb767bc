"""The release packet's part of a model card: the candidate against its parents and baselines on test.

Rendering the card itself (front matter, parents, license, recipe) is `merge.card`, shared with every
merge; this module adds the table only a run can fill.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evomerge.evaluate.stats import paired_comparison


def _score(row: Mapping[str, Any]) -> str:
    stderr = row.get("stderr")
    return f"{row['score']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def comparison_table(test_results: Mapping[str, Any], own: str, label: str) -> str:
    """Markdown: per task, `own` (this candidate's key in the run's test results) and every parent and
    baseline, with the paired difference to the candidate on the same test examples and its p-value
    (`evaluate.stats.paired_comparison`: exact McNemar for 0/1 values, else a paired bootstrap)."""
    mine = test_results[own]["test"]
    lines = [
        "| task | model | kind | test score ± stderr | n | this model − it | 95% CI | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, row in mine.items():
        lines.append(f"| {task} | **{label}** | this model | {_score(row)} | {row['n']} | | | |")
        for name, result in test_results.items():
            other = (result.get("test") or {}).get(task)
            if name == own or other is None or result.get("kind") not in ("parent", "baseline"):
                continue
            shown = name.removeprefix("parent:")
            if "values" in other and "values" in row and len(other["values"]) == len(row["values"]):
                paired = paired_comparison(row["values"], other["values"])
                low, high = paired.ci95
                diff = f"{paired.difference:+.4f} | [{low:+.4f}, {high:+.4f}] | {paired.p_value:.3g}"
            else:
                diff = "| |"
            lines.append(f"| {task} | {shown} | {result['kind']} | {_score(other)} | {other['n']} | {diff} |")
    return "\n".join(lines)
