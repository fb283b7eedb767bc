"""Plotly figures of a run, one function per report section, each from `report.data` values only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from evomerge.flow import FigureStep
from evomerge.lineage.dag import LineageGraph
from evomerge.report.data import Candidate, CoefficientGrid, Projection, RunData

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _legend_above(fig: go.Figure, title: str) -> None:
    """Title at the top, legend in a row between it and the plot: the right margin stays free for colour
    bars and the bottom for animation sliders, so neither overlaps the legend (tests/test_report_browser.py)."""
    fig.update_layout(title={"text": title, "y": 0.98, "yanchor": "top"}, margin={"t": 120},
                      legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1.02, "yanchor": "bottom"})


def _integer_axis(count: int) -> dict:
    """Ticks on whole numbers only (generations, steps), at most about ten of them."""
    return {"tickmode": "linear", "tick0": 0, "dtick": max(1, math.ceil(count / 10)), "tickformat": "d"}


def _reference_traces(fig: go.Figure, references: Mapping[str, float], x: Sequence[float]) -> None:
    # Horizontal lines across the plotted range, as traces so that the legend names them.
    for i, (label, value) in enumerate(references.items()):
        fig.add_scatter(x=[min(x), max(x)], y=[value, value], mode="lines", name=label, hoverinfo="name+y",
                        line={"color": ("#555", "#999")[i % 2], "dash": "dot", "width": 2})


def fitness_figure(stats: Mapping[str, Mapping[str, Sequence[float]]], references: Mapping[str, float]) -> go.Figure:
    """Best so far (solid) and the generation's median (dashed) for the fitness (and each task of several),
    with the best parent's and best untuned merge's fitness as dotted reference lines."""
    fig = go.Figure()
    for i, (name, series) in enumerate(stats.items()):
        color = _COLORS[i % len(_COLORS)]
        fig.add_scatter(x=series["generation"], y=series["best_so_far"], mode="lines+markers",
                        name=f"best {name} so far", line={"color": color, "shape": "hv"}, legendgroup=name)
        fig.add_scatter(x=series["generation"], y=series["median"], mode="lines+markers", name=f"median {name}",
                        line={"color": color, "dash": "dash"}, legendgroup=name)
    generations = next(iter(stats.values()))["generation"]
    _reference_traces(fig, references, generations)
    _legend_above(fig, "Fitness over generations (search split)")
    fig.update_layout(xaxis={"title": "generation", **_integer_axis(len(generations))}, yaxis_title="score",
                      hovermode="x unified")
    return fig


def history_figure(scored: Sequence[Candidate], best_so_far: Sequence[float], references: Mapping[str, float]) -> go.Figure:
    """Every scored candidate's fitness by trial number (raced-out ones at their partial score, hollow), the
    best fully evaluated fitness so far, and the reference lines."""
    fig = go.Figure()
    for status, label, marker in (("complete", "complete", {"color": "#1f77b4", "size": 7}),
                                  ("raced_out", "raced out (partial score)",
                                   {"color": "#999", "size": 7, "symbol": "circle-open"})):
        mine = [c for c in scored if c.status == status]
        if not mine:  # no empty legend entries (a run without racing has no raced-out candidate)
            continue
        fig.add_scatter(x=[c.number for c in mine], y=[c.fitness for c in mine], mode="markers", name=label,
                        marker=marker, text=[f"trial {c.number}, generation {c.generation}" for c in mine])
    fig.add_scatter(x=[c.number for c in scored], y=list(best_so_far), mode="lines", name="best so far",
                    line={"color": "#d62728", "shape": "hv", "width": 3})
    _reference_traces(fig, references, [c.number for c in scored])
    _legend_above(fig, "Every candidate in trial order (search split)")
    fig.update_layout(xaxis={"title": "trial", "tickformat": "d"}, yaxis_title="fitness")
    return fig


def hypervolume_figure(numbers: Sequence[int], volumes: Sequence[float], reference: Sequence[float],
                       tasks: Sequence[str]) -> go.Figure:
    """Hypervolume of the Pareto front so far after each complete candidate."""
    fig = go.Figure()
    fig.add_scatter(x=list(numbers), y=list(volumes), mode="lines+markers", name="hypervolume",
                    line={"shape": "hv", "color": "#2ca02c"})
    point = ", ".join(f"{t} {r:.3f}" for t, r in zip(tasks, reference, strict=True))
    _legend_above(fig, f"Hypervolume of the front so far (reference point: {point})")
    fig.update_layout(xaxis={"title": "trial", "tickformat": "d"}, yaxis_title="hypervolume")
    return fig


def pareto_figure(data: RunData, fronts: Mapping[int, Sequence[int]]) -> go.Figure:
    """First two objectives: every complete candidate, and the Pareto front as of each generation (frames)."""
    x_task, y_task = data.tasks[:2]
    complete = data.complete
    by_number = {c.number: c for c in complete}

    def front_trace(generation: int) -> go.Scatter:
        members = sorted((by_number[n] for n in fronts[generation]), key=lambda c: c.scores[x_task])
        return go.Scatter(
            x=[c.scores[x_task] for c in members], y=[c.scores[y_task] for c in members], mode="lines+markers",
            name="Pareto front", line={"shape": "hv", "color": "#d62728"}, marker={"size": 10},
            text=[f"trial {c.number}" for c in members],
        )

    generations = sorted(fronts)
    everyone = go.Scatter(
        x=[c.scores[x_task] for c in complete], y=[c.scores[y_task] for c in complete], mode="markers",
        name="candidates", marker={"color": [c.generation for c in complete], "colorscale": "Viridis",
                                   "colorbar": {"title": "generation", **_integer_axis(max(generations) + 1)},
                                   "opacity": 0.6},
        text=[f"trial {c.number}, generation {c.generation}" for c in complete],
    )
    fig = go.Figure(data=[everyone, front_trace(generations[-1])])
    fig.frames = [go.Frame(data=[everyone, front_trace(g)], name=str(g)) for g in generations]
    _add_player(fig, [str(g) for g in generations], "front as of generation ")
    _legend_above(fig, f"Pareto front over generations ({x_task} vs {y_task}, search split)")
    fig.update_layout(xaxis_title=x_task, yaxis_title=y_task)
    return fig


def task_scatter_figure(data: RunData, generation: int, population: Sequence[Candidate]) -> go.Figure:
    """One objective: per-task score ± stderr of the last fully told generation's complete candidates."""
    fig = go.Figure()
    for i, task in enumerate(data.tasks):
        fig.add_scatter(
            x=[c.number for c in population], y=[c.scores[task] for c in population], mode="markers", name=task,
            error_y={"type": "data", "array": [c.stderrs.get(task) or 0.0 for c in population]},
            marker={"color": _COLORS[i % len(_COLORS)], "size": 9},
        )
    _legend_above(fig, f"Per-task scores of the final population (generation {generation}, search split)")
    fig.update_layout(xaxis={"title": "trial", "type": "category"}, yaxis_title="score ± stderr")
    return fig


def projection_figure(data: RunData, projection: Projection) -> go.Figure:
    """Genomes in PCA space coloured by fitness; one animation frame per generation; parents as stars."""
    by_number = {c.number: c for c in data.candidates}
    points = {n: projection.coords[i] for i, n in enumerate(projection.numbers)}
    fitnesses = [by_number[n].fitness for n in projection.numbers if by_number[n].fitness is not None]
    low, high = (min(fitnesses), max(fitnesses)) if fitnesses else (0.0, 1.0)
    anchors = _baseline_points(data, projection)

    def generation_trace(generation: int) -> go.Scatter:
        members = [n for n in projection.numbers if by_number[n].generation == generation]
        return go.Scatter(
            x=[points[n][0] for n in members], y=[points[n][1] for n in members], mode="markers", name="population",
            marker={"color": [by_number[n].fitness if by_number[n].fitness is not None else low for n in members],
                    "colorscale": "Viridis", "cmin": low, "cmax": high, "size": 11,
                    "colorbar": {"title": "fitness"}, "line": {"width": 1, "color": "#333"}},
            text=[f"trial {n} ({by_number[n].status}) fitness {by_number[n].fitness}" for n in members],
        )

    generations = sorted({by_number[n].generation for n in projection.numbers})
    fig = go.Figure(data=[generation_trace(generations[-1]), anchors])
    fig.frames = [go.Frame(data=[generation_trace(g), anchors], name=str(g)) for g in generations]
    _add_player(fig, [str(g) for g in generations], "generation ")
    pad = 0.05 + 0.05 * float(abs(projection.coords).max())
    xs = [*projection.coords[:, 0], *anchors.x]
    ys = [*projection.coords[:, 1], *anchors.y]
    _legend_above(fig, "Population in genome space (PCA of genes scaled to their bounds)")
    fig.update_layout(
        xaxis={"title": f"PC1 ({projection.explained[0]:.0%} of variance)", "range": [min(xs) - pad, max(xs) + pad]},
        yaxis={"title": f"PC2 ({projection.explained[1]:.0%} of variance)", "range": [min(ys) - pad, max(ys) + pad]},
    )
    return fig


def _baseline_points(data: RunData, projection: Projection) -> go.Scatter:
    # Parents the genome can express (one task vector at full weight) anchor the picture.
    baselines = data.store.baselines or {}
    named = [(name, b["genome"]) for name, b in baselines.items() if b.get("genome")]
    coords = [projection.project(genome) for _, genome in named]
    return go.Scatter(x=[c[0] for c in coords], y=[c[1] for c in coords], mode="markers+text", name="parents",
                      text=[name for name, _ in named], textposition="top center",
                      marker={"symbol": "star", "size": 16, "color": "#d62728"})


def _add_player(fig: go.Figure, names: Sequence[str], prefix: str) -> None:
    fig.update_layout(
        # Buttons left of the slider, not on top of its first step (found by the browser test).
        updatemenus=[{"type": "buttons", "showactive": False, "x": 0.1, "y": -0.15, "xanchor": "right", "buttons": [
            {"label": "play", "method": "animate",
             "args": [None, {"frame": {"duration": 600, "redraw": True}, "fromcurrent": True}]},
            {"label": "pause", "method": "animate",
             "args": [[None], {"frame": {"duration": 0}, "mode": "immediate"}]},
        ]}],
        # A gap between them too: their boxes overlapped by a pixel (tests/test_report_browser.py).
        sliders=[{"active": len(names) - 1, "x": 0.13, "len": 0.87, "currentvalue": {"prefix": prefix}, "pad": {"t": 40},
                  "steps": [
            {"label": name, "method": "animate",
             "args": [[name], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}}]}
            for name in names
        ]}],
    )


def coefficient_figure(grids: Sequence[CoefficientGrid], bounds: Mapping[str, tuple[float, float]]) -> go.Figure:
    """Layer x parent heatmap of each per-model parameter of the champion (the values the merge used), on a
    sequential scale over the parameter's search bounds (a diverging one made a middling density alarming)."""
    fig = make_subplots(rows=len(grids), cols=1, subplot_titles=[g.param for g in grids], vertical_spacing=0.15)
    for row, grid in enumerate(grids, start=1):
        names = [Path(m).name for m in grid.models]
        hover = [[f"{names[i]} {col}: mean {grid.values[i][j]:.4f} (range {grid.low[i][j]:.4f}..{grid.high[i][j]:.4f})"
                  for j, col in enumerate(grid.columns)] for i in range(len(names))]
        low, high = bounds.get(grid.param, (None, None))
        fig.add_heatmap(
            z=grid.values, x=grid.columns, y=names, text=[[f"{v:.2f}" for v in r] for r in grid.values],
            texttemplate="%{text}", hovertext=hover, hoverinfo="text", colorscale="Viridis", zmin=low, zmax=high,
            colorbar={"len": 0.8 / len(grids), "y": 1 - (row - 0.5) / len(grids), "title": grid.param},
            row=row, col=1,
        )
    fig.update_layout(title="Champion coefficients per layer and parent", height=260 * len(grids) + 80)
    return fig


def path_figure(steps: Sequence[FigureStep]) -> go.Figure:
    """The champion's data-flow path: which layer of which source runs at each step, sized by its scale."""
    fig = go.Figure()
    sources = list(dict.fromkeys(s.source for s in steps))  # as the run named them: often full paths
    fig.add_scatter(x=[s.step for s in steps], y=[s.layer for s in steps], mode="lines", name="path",
                    line={"color": "#bbb"}, showlegend=False)
    for i, source in enumerate(sources):
        mine = [s for s in steps if s.source == source]
        fig.add_scatter(
            x=[s.step for s in mine], y=[s.layer for s in mine], mode="markers", name=Path(source).name,
            marker={"size": [8 + 8 * s.scale for s in mine], "color": _COLORS[i % len(_COLORS)]},
            text=[f"step {s.step}: {Path(s.source).name} layer {s.layer}, scale {s.scale:.3f}" for s in mine],
            hoverinfo="text",
        )
    _legend_above(fig, "Champion's layer path (marker size = input scale)")
    layers = max(s.layer for s in steps) + 1
    fig.update_layout(xaxis={"title": "step", **_integer_axis(len(steps))},
                      yaxis={"title": "source layer", **_integer_axis(layers)})
    return fig


def lineage_figure(graph: LineageGraph) -> go.Figure:
    """The lineage DAG as a layered network: original checkpoints left, the champion right."""
    depth: dict[str, int] = {}

    def level(node_id: str) -> int:
        if node_id not in depth:
            parents = graph.nodes[node_id].parents
            depth[node_id] = 1 + max(map(level, parents)) if parents else 0
        return depth[node_id]

    for node_id in graph.nodes:
        level(node_id)
    columns: dict[int, list[str]] = {}
    for node_id in graph.nodes:
        columns.setdefault(depth[node_id], []).append(node_id)
    position = {n: (d, i - (len(ids) - 1) / 2) for d, ids in columns.items() for i, n in enumerate(ids)}
    edge_x: list[float | None] = []
    edge_y: list[float | None] = []
    for parent, child in graph.edges():
        edge_x += [position[parent][0], position[child][0], None]
        edge_y += [position[parent][1], position[child][1], None]
    fig = go.Figure()
    fig.add_scatter(x=edge_x, y=edge_y, mode="lines", line={"color": "#999"}, hoverinfo="skip", showlegend=False)
    for kind, symbol, color in (("checkpoint", "circle", "#1f77b4"), ("merged", "square", "#2ca02c")):
        ids = [n for n in graph.nodes if graph.nodes[n].kind == kind]
        fig.add_scatter(
            x=[position[n][0] for n in ids], y=[position[n][1] for n in ids], mode="markers+text", name=kind,
            marker={"symbol": symbol, "size": 18, "color": color},
            text=[_short(graph, n) for n in ids], textposition="bottom center",
            hovertext=[graph.nodes[n].label for n in ids], hoverinfo="text",
        )
    fig.update_layout(title="Lineage", xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def _short(graph: LineageGraph, node_id: str) -> str:
    node = graph.nodes[node_id]
    if node.kind == "checkpoint":
        return Path(node.details.get("path", node.details.get("ref", ""))).name
    run = node.details.get("run") or {}
    return f"{run.get('study')} #{run.get('trial')}"

