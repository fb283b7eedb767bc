"""Optuna's own views of the search, the ones its users know: parameter importance (fANOVA), parallel
coordinates and slice plots of the most important genes.

They are drawn by `optuna.visualization` on the run's study. Only fully scored candidates enter them:
Optuna keeps COMPLETE trials (raced-out candidates are PRUNED) that hold every parameter asked about (the
parents' and baselines' fixed trials hold none).
"""

from __future__ import annotations

import warnings

import optuna
import plotly.graph_objects as go

from evomerge.report.data import RunData

#: Below this many fully evaluated candidates an importance estimate is noise, and is not drawn.
MIN_TRIALS = 10
#: fANOVA's forest, smaller than Optuna's default (64 trees, depth 64): on 400 trials of 21 or 88 genes the
#: default took 27-29 s per report on this machine, 16 trees of depth 8 took 3-5 s and ranked the genes that
#: matter the same (a synthetic study where the value depends on two genes).
FOREST = {"n_trees": 16, "max_depth": 8}
#: Genes shown in the parallel-coordinates and slice plots: the most important ones (fewer slices, which
#: sit side by side).
TOP_GENES = 8
TOP_SLICES = 4


def _target(data: RunData) -> tuple[object, str]:
    # A Pareto study has several values; the views follow the first objective, named as the study names it.
    if data.config.combine == "pareto":
        return (lambda trial: trial.values[0]), data.tasks[0]
    return None, "fitness"


def importance(data: RunData) -> tuple[dict[str, float] | None, str]:
    """(gene -> importance, "") or (None, why not), by Optuna's fANOVA evaluator (seeded, `FOREST`)."""
    names = [gene["name"] for gene in data.genes]
    if len(data.complete) < MIN_TRIALS or not names:
        return None, (f"Parameter importance needs at least {MIN_TRIALS} fully evaluated candidates; "
                      f"this run has {len(data.complete)}.")
    target, _ = _target(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            scores = optuna.importance.get_param_importances(
                data.store.study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0, **FOREST), params=names,
                target=target,
            )
    except (RuntimeError, ValueError) as error:  # e.g. every candidate scored the same: no variance to split
        return None, f"Parameter importance could not be estimated: {error}"
    return dict(scores), ""


def importance_figure(scores: dict[str, float]) -> go.Figure:
    """Horizontal bars, the most important gene on top (at most 30 bars)."""
    shown = sorted(scores.items(), key=lambda item: item[1], reverse=True)[:30][::-1]
    fig = go.Figure(go.Bar(x=[v for _, v in shown], y=[n for n, _ in shown], orientation="h", name="importance",
                           marker={"color": "#1f77b4"}))
    fig.update_layout(title="Parameter importance (Optuna's fANOVA evaluator, fully evaluated candidates)",
                      xaxis_title="share of the fitness variance", height=max(400, 22 * len(shown) + 160),
                      showlegend=False)
    return fig


def top_genes(scores: dict[str, float]) -> list[str]:
    return [name for name, _ in sorted(scores.items(), key=lambda item: item[1], reverse=True)[:TOP_GENES]]


def parallel_figure(data: RunData, genes: list[str]) -> go.Figure:
    target, name = _target(data)
    fig = optuna.visualization.plot_parallel_coordinate(data.store.study, params=genes, target=target,
                                                        target_name=name)
    fig.update_layout(title=f"Parallel coordinates of the {len(genes)} most important genes")
    return fig


def slice_figure(data: RunData, genes: list[str]) -> go.Figure:
    target, name = _target(data)
    genes = genes[:TOP_SLICES]
    fig = optuna.visualization.plot_slice(data.store.study, params=genes, target=target, target_name=name)
    # Optuna sizes the figure 300 px per gene; the page's width suits the report.
    fig.update_layout(title=f"{name} against each of the {len(genes)} most important genes (colour: trial number)",
                      width=None, autosize=True)
    return fig
