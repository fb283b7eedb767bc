"""Report sections of optional search features, as HTML tables: the estimated fitness's error against the
full search-split fitness (`fitness.estimator`), and the pre-screen of a parents pool (`parents_pool`).

Each function returns `(id, title, body, note)` tuples, none when the run did not use the feature, so
`report.html` shows them without knowing their contents.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from evomerge.search.pool import SELECT, SELECTED_AT
from evomerge.search.store import RunStore

ExtraSection = tuple[str, str, str, str]


def extra_sections(store: RunStore) -> list[ExtraSection]:
    """The optional sections this run has data for, in display order."""
    return [s for s in (estimate_error_section(store), pool_screen_section(store)) if s is not None]


def _ranks(values: np.ndarray) -> np.ndarray:
    order = values.argsort(kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def estimate_error_section(store: RunStore) -> ExtraSection | None:
    """Every candidate scored both ways (warm-up and audited candidates): estimate, full fitness, error."""
    pairs = [(r.number, r.estimate["fitness"], r.fitness) for r in store.fully_evaluated() if r.estimate is not None]
    if not pairs:
        return None
    estimated = [r for r in store.trials() if r.estimate is not None]
    numbers, told, full = (np.array(column, dtype=np.float64) for column in zip(*pairs, strict=True))
    error = told - full
    summary = (
        f"{len(pairs)} of the {len(estimated)} candidates with an estimate also scored on the whole split "
        f"({estimated[0].estimate['examples']} anchor examples each, estimator {estimated[0].estimate['estimator']}, "
        f"anchors answered by {estimated[0].estimate.get('answers', 'generated')}): "
        f"mean error {error.mean():+.4f}, RMSE {np.sqrt((error ** 2).mean()):.4f}"
    )
    if len(pairs) >= 3 and told.std() > 0 and full.std() > 0:
        summary += f", Spearman {np.corrcoef(_ranks(told), _ranks(full))[0, 1]:.3f}"
    rows = "".join(
        f"<tr><td>{int(n)}</td><td>{t:.4f}</td><td>{f:.4f}</td><td>{t - f:+.4f}</td></tr>"
        for n, t, f in zip(numbers, told, full, strict=True)
    )
    table = f"<p>{html.escape(summary)}</p><table><tr><th>trial</th><th>estimate</th><th>full</th><th>error</th></tr>{rows}</table>"
    note = "The champion is chosen on full search-split fitness only; the optimizer was told the estimates."
    return "estimation", "Estimated fitness against full search-split fitness", table, note


def pool_screen_section(store: RunStore) -> ExtraSection | None:
    """Each pool model's distance from the base, search-split scores, screen verdict, and task-vector cosines."""
    evidence = store.evidence or {}
    screen = evidence.get("pool_screen")
    if screen is None:
        return None
    baselines = store.baselines or {}
    names = [Path(m).name for m in screen["models"]]
    tasks = sorted({t for b in baselines.values() if b.get("kind") == "parent" for t in b["search"]})
    header = "".join(f"<th>{html.escape(t)}</th>" for t in tasks)
    rows = []
    for model, name, distance, cosines in zip(screen["models"], names, screen["distance"], screen["cosine"], strict=True):
        scores = baselines.get(f"parent:{name}", {}).get("search", {})
        cells = "".join(f"<td>{scores[t]['score']:.3f}</td>" if t in scores else "<td>-</td>" for t in tasks)
        verdict = html.escape(screen["rejected"].get(model, "kept"))
        cosine = "".join(f"<td>{c:+.2f}</td>" for c in cosines)
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{distance:.3f}</td>{cells}<td>{verdict}</td>{cosine}</tr>")
    cosine_header = "".join(f"<th>cos {html.escape(n)}</th>" for n in names)
    table = (f"<table><tr><th>pool model</th><th>‖Δ‖/‖base‖</th>{header}<th>screen</th>{cosine_header}</tr>"
             f"{''.join(rows)}</table>")
    note = "Search-split scores of the models the screen kept (they are scored as parents); a rejected model is never merged."
    start = _selected_at_start(store)
    if start:
        started = ", ".join(html.escape(Path(m).name) for m in screen["models"] if start.get(m))
        table += f"<p>CMA-ES started with these selected (they cover the most search-split answers together): {started}</p>"
    return "pool", "Parents pool: pre-screen", table, note


def _selected_at_start(store: RunStore) -> dict[str, bool]:
    """Pool model -> whether the search's start selected it (empty when no start was recorded)."""
    x0 = store.x0 or {}
    return {
        gene["model"]: x0[gene["name"]] >= SELECTED_AT
        for gene in store.genes if gene["param"] == SELECT and gene["name"] in x0
    }
