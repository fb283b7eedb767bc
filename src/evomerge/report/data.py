"""Tidy data behind the report, computed from a run's study: no plotting here, so it can be tested exactly.

Works on finished and running runs alike: before selection has happened the champion is the best
fully evaluated candidate so far (`RunStore.champion`, the rule selection applies at the end). Runs are
read through the run store only.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.flow import FigureStep, path_figure_data
from evomerge.merge import Recipe
from evomerge.merge.plan import job_parameters, plan_jobs
from evomerge.models import Checkpoint, tensor_role
from evomerge.search.config import EvolveConfig
from evomerge.search.dfs import PathCandidate
from evomerge.search.results import pareto_set
from evomerge.search.store import RunStore, TrialRecord, load_run, recipe_of

FITNESS = "fitness"


@dataclass(frozen=True)
class Candidate:
    """One trial as the report sees it."""

    number: int
    generation: int
    status: str
    fitness: float | None
    scores: dict[str, float]
    stderrs: dict[str, float | None]
    genes: dict[str, float]
    fully_evaluated: bool


@dataclass(frozen=True)
class RunData:
    """Everything the report draws, loaded once from the run directory."""

    run_dir: Path
    config: EvolveConfig
    store: RunStore
    candidates: list[Candidate]
    tasks: list[str]
    signs: list[float]
    genes: list[dict[str, Any]]
    champion: int | None

    @property
    def complete(self) -> list[Candidate]:
        """Fully evaluated candidates (raced-out ones have partial scores, duplicates repeat others)."""
        return [c for c in self.candidates if c.fully_evaluated]

    @property
    def generations(self) -> list[int]:
        return sorted({c.generation for c in self.candidates})


def load_run_data(run_dir: str | Path) -> RunData:
    """Read a run directory's config and study into `RunData`."""
    run_dir = Path(run_dir)
    config, store = load_run(run_dir)
    tasks = [o.name or Path(o.task).stem for o in config.objectives]
    candidates = []
    for trial in store.trials():
        if trial.status is None or trial.generation is None:
            continue  # asked but never told (in flight) or re-queued
        scores = trial.scores or {}
        candidates.append(Candidate(
            number=trial.number,
            generation=trial.generation,
            status=trial.status,
            fitness=trial.fitness,
            scores={name: entry["score"] for name, entry in scores.items()},
            stderrs={name: entry.get("stderr") for name, entry in scores.items()},
            genes=dict(trial.params),
            fully_evaluated=trial.fully_evaluated,
        ))
    # Task names as the evaluator reported them (task files name themselves); config order kept.
    reported = [name for c in candidates for name in c.scores]
    if reported:
        tasks = list(dict.fromkeys(reported))
    signs = [o.sign for o in config.objectives]
    return RunData(run_dir, config, store, candidates, tasks, signs, store.genes, store.champion())


def champion_trial(data: RunData) -> TrialRecord | None:
    """The champion's trial (selected, else best so far), or None before any candidate finished."""
    if data.champion is None:
        return None
    return data.store.trials()[data.champion]


# --- progress over generations -------------------------------------------------------------------
def generation_stats(data: RunData) -> dict[str, dict[str, list[float]]]:
    """Per objective: the best so far (over every complete candidate up to and including the generation)
    and the generation's median, with `generation` the x values; best respects the task's direction.

    The fitness always; each task as well only when there are several (with one, the fitness is that
    task's score up to its weight, and a second curve would hide under the first).
    """
    stats: dict[str, dict[str, list[float]]] = {}
    objectives = [(FITNESS, 1.0), *(zip(data.tasks, data.signs) if len(data.tasks) > 1 else ())]
    generations = [g for g in data.generations if any(c.generation == g for c in data.complete)]
    for name, sign in objectives:
        best, median = [], []
        for generation in generations:
            values = [_objective(c, name) for c in data.complete if c.generation == generation]
            so_far = [_objective(c, name) for c in data.complete if c.generation <= generation]
            best.append(max(so_far, key=lambda v: sign * v))
            median.append(statistics.median(values))
        stats[name] = {"generation": generations, "best_so_far": best, "median": median}
    return stats


def reference_lines(data: RunData) -> dict[str, float]:
    """The search fitness to beat: the best parent's and the best untuned merge's (label -> fitness)."""
    lines = {}
    for kind, label in (("parent", "best parent"), ("untuned", "best untuned merge")):
        scored = {name: b["fitness"] for name, b in (data.store.baselines or {}).items()
                  if b.get("kind") == kind and b.get("fitness") is not None}
        if scored:
            name = max(scored, key=lambda n: scored[n])
            lines[f"{label} ({name.removeprefix('parent:')})"] = scored[name]
    return lines


def trial_history(data: RunData) -> tuple[list[Candidate], list[float]]:
    """Every scored candidate in trial order (complete, and raced-out with its partial fitness) and the best
    fully evaluated fitness so far after each of them (NaN before the first)."""
    scored = [c for c in data.candidates if c.fitness is not None and c.status in ("complete", "raced_out")]
    best, so_far = float("nan"), []
    for candidate in scored:
        if candidate.fully_evaluated and not candidate.fitness <= best:  # NaN compares false: the first one
            best = candidate.fitness
        so_far.append(best)
    return scored, so_far


def final_population(data: RunData) -> tuple[int, list[Candidate]]:
    """The last generation whose candidates have all been told (a search that stopped or is running part of
    the way through a generation shows the one before), and its complete candidates."""
    size = data.store.population
    counts = {g: sum(c.generation == g for c in data.candidates) for g in data.generations}
    full = [g for g in counts if size is None or counts[g] >= size]
    complete = {c.generation for c in data.complete}
    generation = max((g for g in full if g in complete), default=max(complete))
    return generation, [c for c in data.complete if c.generation == generation]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Exact hypervolume dominated by `points` (larger is better on every axis) above `reference`, by
    slicing along the first axis (fronts here hold tens of points on a few objectives)."""
    points = [p for p in points if all(x > r for x, r in zip(p, reference, strict=True))]
    if not points:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in points) - reference[0]
    levels = sorted({p[0] for p in points}, reverse=True)
    volume = 0.0
    for upper, lower in zip(levels, [*levels[1:], reference[0]]):
        # Between `lower` and `upper` on axis 0, every point reaching `upper` dominates the rest of the axes.
        volume += (upper - lower) * hypervolume([p[1:] for p in points if p[0] >= upper], reference[1:])
    return volume


def hypervolume_history(data: RunData) -> tuple[list[int], list[float], list[float]]:
    """After each complete candidate (trial order): the hypervolume of the front so far, per-task scores
    oriented larger-is-better, above the reference point (the worst score any complete candidate or
    parent reached on each task); returns (trial numbers, hypervolumes, reference point)."""
    oriented = [[sign * c.scores[t] for t, sign in zip(data.tasks, data.signs, strict=True)] for c in data.complete]
    parents = [[sign * b["search"][t]["score"] for t, sign in zip(data.tasks, data.signs, strict=True)]
               for b in (data.store.baselines or {}).values() if b.get("kind") == "parent"
               and all(t in b.get("search", {}) for t in data.tasks)]
    reference = [min(column) for column in zip(*oriented, *parents, strict=True)]
    front: list[list[float]] = []
    volumes: list[float] = []
    for point in oriented:  # the front so far: only a new non-dominated point changes the volume
        if not any(all(f >= x for f, x in zip(other, point, strict=True)) for other in front):
            front = [f for f in front if not all(x >= y for x, y in zip(point, f, strict=True))] + [point]
            volumes.append(hypervolume(front, reference))
        else:
            volumes.append(volumes[-1])
    return [c.number for c in data.complete], volumes, reference


def _objective(candidate: Candidate, name: str) -> float:
    return candidate.fitness if name == FITNESS else candidate.scores[name]


def pareto_fronts(data: RunData) -> dict[int, list[int]]:
    """For each generation g, the trial numbers on the Pareto front of all complete candidates up to g
    (per-task scores, each oriented so larger is better)."""
    fronts = {}
    for generation in data.generations:
        points = {
            c.number: [sign * c.scores[t] for t, sign in zip(data.tasks, data.signs, strict=True)]
            for c in data.complete if c.generation <= generation
        }
        if points:
            fronts[generation] = sorted(pareto_set(points))
    return fronts


# --- genome projection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Projection:
    """Candidates' genomes in the plane of their two principal components (genes scaled to [0, 1])."""

    numbers: list[int]
    coords: np.ndarray  # (n, 2)
    explained: tuple[float, float]  # fraction of variance per component
    components: np.ndarray  # (2, genes): the axes, to project other genomes (baselines)
    mean: np.ndarray
    low: np.ndarray
    span: np.ndarray
    names: list[str]

    def project(self, genes: Mapping[str, float]) -> np.ndarray:
        """Coordinates of another genome in the same plane."""
        x = (np.array([genes[n] for n in self.names]) - self.low) / self.span
        return (x - self.mean) @ self.components.T


def genome_projection(data: RunData) -> Projection | None:
    """PCA (SVD of the centred, bounds-scaled genome matrix) of every candidate with genes; None if < 2."""
    names = [g["name"] for g in data.genes]
    rows = [c for c in data.candidates if names and all(n in c.genes for n in names)]
    if len(rows) < 2:
        return None
    low = np.array([g["low"] for g in data.genes], dtype=float)
    span = np.array([g["high"] - g["low"] for g in data.genes], dtype=float)
    # Scaling by the bounds keeps a wide-range gene from dominating the components.
    x = (np.array([[c.genes[n] for n in names] for c in rows]) - low) / span
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = np.zeros((2, len(names)))
    components[: min(2, len(vt))] = vt[:2]
    total = float((singular**2).sum()) or 1.0
    var = [(float(s) ** 2) / total for s in singular[:2]] + [0.0, 0.0]
    return Projection(
        [c.number for c in rows], (x - mean) @ components.T, (var[0], var[1]), components, mean, low, span, names
    )


# --- champion coefficients -----------------------------------------------------------------------
@dataclass(frozen=True)
class CoefficientGrid:
    """One per-model parameter of a recipe over the donor's tensors, averaged per layer column.

    `values[m][j]` is the mean over the tensors of column `j` of the value the merge used for model `m`;
    `low`/`high` the range within the column (they differ when the genome varies by block kind).
    """

    param: str
    models: list[str]
    columns: list[str]
    values: list[list[float]]
    low: list[list[float]]
    high: list[list[float]]


def column_of(tensor_name: str, model_type: str | None) -> str:
    """Heatmap column of a tensor: `embed`, `L<i>` for decoder layer i, `out` for final norm / head."""
    role = tensor_role(tensor_name, model_type)
    if role.layer is not None:
        return f"L{role.layer}"
    return "embed" if role.kind == "embedding" else "out"


def coefficient_grids(recipe: Recipe, donor: Checkpoint) -> list[CoefficientGrid]:
    """Per-model parameters of a `models` recipe (weight first) over the donor's layer columns."""
    if recipe.slices:
        return []
    spec = recipe.operator
    merged = [e.model for e in recipe.models if e.model != recipe.base_model or not (spec.needs_base or spec.space == "delta")]
    params = [p.name for p in spec.params if p.per_model and not p.is_flag
              and any(p.name in e.parameters for e in recipe.models)]
    params.sort(key=lambda name: name != "weight")
    # The values the merge itself uses: the plan's jobs with merge's own parameter precedence.
    jobs = [job for job in plan_jobs(recipe, spec, {recipe.reference_ref(): donor}) if not job.copy]
    resolved = [(job.out_name, job_parameters(spec, job)) for job in jobs]
    columns = list(dict.fromkeys(sorted((column_of(n, donor.model_type) for n, _ in resolved), key=_column_order)))
    grids = []
    for param in params:
        per_column: dict[str, list[list[float]]] = {c: [[] for _ in merged] for c in columns}
        for name, values in resolved:
            for i, value in enumerate(values[param]):
                per_column[column_of(name, donor.model_type)][i].append(float(value))
        grids.append(CoefficientGrid(
            param, merged, columns,
            [[float(np.mean(per_column[c][i])) for c in columns] for i in range(len(merged))],
            [[min(per_column[c][i]) for c in columns] for i in range(len(merged))],
            [[max(per_column[c][i]) for c in columns] for i in range(len(merged))],
        ))
    return grids


def _column_order(column: str) -> tuple[int, int]:
    if column == "embed":
        return (0, 0)
    if column == "out":
        return (2, 0)
    return (1, int(column[1:]))


# --- DFS path and result table -------------------------------------------------------------------
def champion_path(trial: TrialRecord) -> list[FigureStep] | None:
    """The champion's layer path when the run searched data-flow space (its `PathCandidate`)."""
    if not trial.path:
        return None
    spec = PathCandidate.from_json(trial.path).spec
    return path_figure_data(spec) if spec else None


@dataclass(frozen=True)
class ResultRow:
    """One line of the comparison table: search- and test-split score ± stderr per task."""

    name: str
    role: str
    search: dict[str, dict[str, Any] | None]
    test: dict[str, dict[str, Any] | None]


def result_rows(data: RunData) -> list[ResultRow]:
    """Champion, specialists, challengers (test split, after selection), parents and baselines."""
    test_results = data.store.test_results
    baselines = data.store.baselines or {}
    rows = []
    order = sorted(test_results.items(), key=lambda item: item[1]["kind"] != "candidate")
    for name, result in order:
        search = result.get("search") or (baselines.get(name) or {}).get("search") or {}
        rows.append(ResultRow(name, ", ".join(result.get("roles", [result["kind"]])), search, result.get("test") or {}))
    if not test_results:
        # Still searching: the champion so far and the baselines, search split only.
        trial = champion_trial(data)
        if trial is not None:
            rows.append(ResultRow(f"candidate:{trial.number}", "champion so far", trial.scores or {}, {}))
        rows += [ResultRow(name, b["kind"], b["search"], {}) for name, b in baselines.items()]
    return rows


def champion_recipe(data: RunData) -> Recipe | None:
    """The champion's decoded recipe, or None before any candidate finished (or for a layer path)."""
    trial = champion_trial(data)
    return recipe_of(trial) if trial is not None and trial.recipe is not None else None


def score_pairs(rows: Sequence[ResultRow], tasks: Sequence[str]) -> list[str]:
    """Tasks that appear in any row, in the run's task order (for table columns)."""
    present = {t for row in rows for t in (*row.search, *row.test)}
    return [t for t in tasks if t in present]
