"""The evolution report: one self-contained HTML file (plotly.js inlined once), optional PNGs.

Sections (ids are stable, the browser test looks for them): `summary`, `fitness` (best so far per
generation against the best parent and untuned merge), `history` (every trial), `pareto` and
`hypervolume` (>= 2 objectives) or `task-scores` (one), `importance`, `parallel`, `slice` (Optuna's
views), `projection`, `coefficients` (parameter-space runs) or `path` (data-flow runs), `results`,
`lineage`. A section whose data does not exist yet (a run still in its first generation,
parents moved away) says why instead of failing the whole report.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import yaml
from plotly.offline import get_plotlyjs

from evomerge.errors import EvomergeError, ExportError
from evomerge.lineage.dag import LineageGraph, LineageNode, lineage
from evomerge.models import Checkpoint
from evomerge.report import figures, optuna_views
from evomerge.report.data import (
    RunData,
    champion_path,
    champion_recipe,
    champion_trial,
    coefficient_grids,
    final_population,
    generation_stats,
    genome_projection,
    hypervolume_history,
    load_run_data,
    pareto_fronts,
    reference_lines,
    result_rows,
    score_pairs,
    trial_history,
)
from evomerge.report.extras import extra_sections

PNG_SIZE = (1000, 600)


@dataclass
class Section:
    """One part of the report: a figure, an HTML fragment, or a note saying why it is empty."""

    id: str
    title: str
    figure: go.Figure | None = None
    body: str = ""
    note: str = ""


@dataclass(frozen=True)
class ReportResult:
    """What `write_report` produced."""

    path: Path
    sections: list[str]
    pngs: list[Path] = field(default_factory=list)


def build_sections(data: RunData) -> list[Section]:
    """Every section of the report for one run, in display order."""
    sections = [_summary(data), _progress(data), _history(data), *_front(data), *_optuna_views(data),
                _projection(data)]
    if data.config.dfs is None:
        sections.append(_coefficients(data))
    else:  # a layer-path run's champion is a path, not merge coefficients
        sections.append(_path(data))
    sections += [_results(data), _lineage(data)]
    sections += [Section(id_, title, body=body, note=note) for id_, title, body, note in extra_sections(data.store)]
    return sections


def _path(data: RunData) -> Section:
    title = "Data-flow path of the champion"
    trial = champion_trial(data)
    steps = champion_path(trial) if trial is not None else None
    if not steps:
        return Section("path", title, note="No candidate has been fully evaluated yet.")
    return Section("path", title, figures.path_figure(steps))


def _summary(data: RunData) -> Section:
    config = data.config
    counts = {s: sum(c.status == s for c in data.candidates) for s in ("complete", "raced_out", "duplicate", "failed")}
    dfs = config.dfs
    method = config.method if dfs is None else (
        f"layer paths (DFS) through {len(dfs.sources) + (dfs.ps_run is not None)} source(s), {dfs.repeats} repeats")
    items = [
        ("run", str(data.run_dir.resolve())),
        ("method", method),
        ("candidates", ", ".join(f"{n} {s}" for s, n in counts.items())),
        ("champion", "-" if data.champion is None else f"trial {data.champion}"),
        ("CMA-ES start" if config.resolved_optimizer == "cmaes" else "start", _start_text(config.start)),
        ("intended use", config.intended_use or "(not stated)"),
    ]
    for name, baseline in (data.store.baselines or {}).items():
        if baseline.get("kind") == "untuned":
            items.append((f"baseline {name}", _settings_text(baseline)))
    evidence = data.store.evidence
    if evidence is not None:
        items += [(f"parent ({p['role']})", f"{p['path']} sha256 {p['content_hash'][:16]}") for p in evidence["parents"]]
        items.append(("compatibility", evidence["compatibility"]["verdict"]))
        items += [
            (f"task {t['name']}", f"{t['path']} sha256 {t['fingerprint'][:16]}, n={t['n']['search']} search / {t['n']['test']} test")
            for t in evidence["suite"]
        ]
        items.append(("software", ", ".join(f"{k} {v}" for k, v in evidence["software"].items())))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    return Section("summary", f"Run {config.name}", body=f"<table class='kv'>{rows}</table>")


def _start_text(start: str) -> str:
    return {
        "init": "init: every gene at its configured init (the paper's start)",
        "best_baseline": "best_baseline: the best parent the genome can express",
    }[start]


def _settings_text(baseline: dict) -> str:
    """An untuned baseline as 'method: parent weight=.. density=..; ...' (a failed one says why)."""
    if baseline.get("failure"):
        return f"failed: {baseline['failure']}"
    recipe = yaml.safe_load(baseline.get("recipe") or "{}") or {}
    models = "; ".join(
        f"{Path(entry['model']).name} " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in (entry.get("parameters") or {}).items())
        for entry in recipe.get("models", [])
    )
    return f"{recipe.get('method', '?')}: {models}" if models else str(recipe.get("method", "?"))


NOT_YET = "No candidate has been fully evaluated yet."


def _progress(data: RunData) -> Section:
    title = "Fitness over generations"
    if not data.complete:
        return Section("fitness", title, note=NOT_YET)
    return Section("fitness", title, figures.fitness_figure(generation_stats(data), reference_lines(data)))


def _history(data: RunData) -> Section:
    title = "Every candidate"
    scored, best = trial_history(data)
    if not data.complete:
        return Section("history", title, note=NOT_YET)
    return Section("history", title, figures.history_figure(scored, best, reference_lines(data)))


def _front(data: RunData) -> list[Section]:
    if not data.complete:
        return [Section("task-scores", "Per-task scores", note=NOT_YET)]
    if len(data.tasks) >= 2:
        numbers, volumes, reference = hypervolume_history(data)
        return [Section("pareto", "Pareto front over generations", figures.pareto_figure(data, pareto_fronts(data))),
                Section("hypervolume", "Hypervolume over time",
                        figures.hypervolume_figure(numbers, volumes, reference, data.tasks))]
    generation, population = final_population(data)
    return [Section("task-scores", "Per-task scores of the final population",
                    figures.task_scatter_figure(data, generation, population))]


def _optuna_views(data: RunData) -> list[Section]:
    scores, why = optuna_views.importance(data)
    if scores is None:
        return [Section("importance", "Parameter importance", note=why)]
    genes = optuna_views.top_genes(scores)
    return [
        Section("importance", "Parameter importance", optuna_views.importance_figure(scores)),
        Section("parallel", "Parallel coordinates", optuna_views.parallel_figure(data, genes)),
        Section("slice", "Slice plots", optuna_views.slice_figure(data, genes)),
    ]


def _projection(data: RunData) -> Section:
    projection = genome_projection(data)
    if projection is None:
        return Section("projection", "Population in genome space", note="Fewer than two candidates with genes.")
    return Section("projection", "Population in genome space", figures.projection_figure(data, projection))


def _coefficients(data: RunData) -> Section:
    title = "Champion coefficients"
    recipe = champion_recipe(data)
    if recipe is None:
        return Section("coefficients", title, note="No champion yet.")
    try:
        donor = Checkpoint.open(recipe.reference_ref())
    except EvomergeError as error:
        return Section("coefficients", title, note=f"The donor's tensor names are needed and it cannot be opened: {error}")
    grids = coefficient_grids(recipe, donor)
    if not grids:
        return Section("coefficients", title, note="The champion's recipe has no per-model coefficients.")
    bounds: dict[str, tuple[float, float]] = {}
    for gene in data.genes:  # the colour scale spans what the search could choose
        low, high = bounds.get(gene["param"], (gene["low"], gene["high"]))
        bounds[gene["param"]] = (min(low, gene["low"]), max(high, gene["high"]))
    return Section("coefficients", title, figures.coefficient_figure(grids, bounds))


def _results(data: RunData) -> Section:
    rows = result_rows(data)
    tasks = score_pairs(rows, data.tasks)
    header = "".join(f"<th>{html.escape(t)} search</th><th>{html.escape(t)} test</th>" for t in tasks)

    def cell(entry: dict | None) -> str:
        if not entry:
            return "<td>-</td>"
        stderr = entry.get("stderr")
        text = f"{entry['score']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
        return f"<td>{text} <span class='n'>n={entry['n']}</span></td>"

    body = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.role)}</td>"
        + "".join(cell(r.search.get(t)) + cell(r.test.get(t)) for t in tasks) + "</tr>"
        for r in rows
    )
    note = "" if data.store.test_results else "Test-split scores appear once the run has finished."
    table = f"<table class='results'><tr><th>model</th><th>role</th>{header}</tr>{body}</table>"
    return Section("results", "Champion, specialists, challengers, parents and baselines", body=table, note=note)


def _lineage(data: RunData) -> Section:
    title = "Lineage"
    if data.store.selection is None:
        return Section("lineage", title, note="The lineage is drawn once the run has selected its champion.")
    if data.config.dfs is not None:
        graph = _path_lineage(data)
        if graph is None:
            return Section("lineage", title, note="The run recorded no evidence of its sources.")
        return Section("lineage", title, figures.lineage_figure(graph))
    try:
        graph = lineage(data.run_dir)
    except EvomergeError as error:
        return Section("lineage", title, note=f"The lineage cannot be traced: {error}")
    return Section("lineage", title, figures.lineage_figure(graph))


def _path_lineage(data: RunData) -> LineageGraph | None:
    """A layer-path champion reads layers of its sources (no merge recipe, which `lineage` follows): the
    sources as recorded in the run's evidence, then the champion."""
    evidence = data.store.evidence
    if evidence is None:
        return None
    champion = f"candidate:{data.champion}"
    graph = LineageGraph(root=champion)
    for parent in evidence["parents"]:
        node_id = f"sha256:{parent['content_hash']}"
        graph.nodes[node_id] = LineageNode(node_id, "checkpoint", f"{parent['path']} sha256 {parent['content_hash'][:16]}",
                                           {"path": parent["path"]})
    graph.nodes[champion] = LineageNode(
        champion, "merged", f"layer path, trial {data.champion} of run {data.config.name}",
        {"run": {"study": data.config.name, "trial": data.champion}}, parents=[n for n in graph.nodes if n != champion],
    )
    return graph


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section { margin-bottom: 2.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: 90%; } td, th { border: 1px solid #ddd; padding: .3em .6em; text-align: left; }
.note { color: #8a6d3b; background: #fcf8e3; padding: .5em; } .n { color: #888; font-size: 80%; }
"""


def render_html(sections: Sequence[Section], *, title: str, refresh_seconds: float | None = None) -> str:
    """The HTML document: plotly.js once in the head (no network needed), one div per figure."""
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_seconds)}">' if refresh_seconds else ""
    parts = []
    for section in sections:
        inner = [f"<h2>{html.escape(section.title)}</h2>"]
        if section.note:
            inner.append(f"<p class='note'>{html.escape(section.note)}</p>")
        if section.body:
            inner.append(section.body)
        if section.figure is not None:
            inner.append(pio.to_html(section.figure, include_plotlyjs=False, full_html=False,
                                     div_id=f"fig-{section.id}", auto_play=False))
        parts.append(f"<section id='{section.id}'>{''.join(inner)}</section>")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}<title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style><script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def write_pngs(sections: Sequence[Section], png_dir: Path) -> list[Path]:
    """PNG of every figure via kaleido (headless Chromium, one browser for all figures)."""
    png_dir.mkdir(parents=True, exist_ok=True)
    with_figures = [s for s in sections if s.figure is not None]
    paths = [png_dir / f"{s.id}.png" for s in with_figures]
    try:
        pio.write_images([s.figure for s in with_figures], paths, width=PNG_SIZE[0], height=PNG_SIZE[1])
    except (RuntimeError, ValueError, OSError) as error:
        raise ExportError(
            f"PNG export to {png_dir} needs kaleido and a Chrome/Chromium (apt-get install chromium): {error}"
        ) from None
    return paths


def write_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    png_dir: str | Path | None = None,
    refresh_seconds: float | None = None,
) -> ReportResult:
    """Write the report of `run_dir` to `out` (default `RUN/report.html`), atomically; PNGs optional."""
    data = load_run_data(run_dir)
    out = Path(out) if out is not None else data.run_dir / "report.html"
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give the report's file name (for example {out / 'report.html'})")
    sections = build_sections(data)
    document = render_html(sections, title=f"evomerge report: {data.config.name}", refresh_seconds=refresh_seconds)
    # Write beside and rename, so a browser refreshing during --watch never sees half a file.
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        tmp.replace(out)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write the report to {out}: {error.strerror}") from None
    pngs = write_pngs(sections, Path(png_dir)) if png_dir is not None else []
    return ReportResult(out, [s.id for s in sections], pngs)


def watch(
    run_dir: str | Path,
    out: str | Path | None,
    seconds: float,
    on_write: Callable[[ReportResult], None],
    *,
    rounds: int | None = None,
) -> None:
    """Rewrite the report every `seconds` (the page reloads itself as often) until interrupted or `rounds`."""
    done = 0
    while rounds is None or done < rounds:
        on_write(write_report(run_dir, out, refresh_seconds=seconds))
        done += 1
        if rounds is None or done < rounds:
            time.sleep(seconds)
