"""Search efficiency: CMA-ES vs TPE vs random search at the same evaluation budget, and NSGA-II on the
two-objective version, on the default tiny zoo.

Single objective: the zoo's `target` task (held-out composition of add / translate / reverse), DARE-TIES
with one global density and one weight per layer and parent (the demo genome). Every optimizer gets the
same number of candidates per seed; racing is off so an evaluation is always the full search split and
the optimizers are compared on equal terms. After a run, the incumbent (best search fitness so far) at
each checkpoint is scored once on the **test** split — only those few trials, never every candidate.

Two objectives: `add` and `translate` kept apart (`combine: pareto`), NSGA-II vs random search; the
hypervolume (reference point (0, 0), both scores in [0, 1]) of the search-split front at each checkpoint,
and of the final front re-scored on test, plus the best equal-weight mean on the test front.

    python benchmarks/search_efficiency.py [--zoo DIR] [--candidates 100] [--seeds 5]
        [--pareto-candidates 160] [--part single|pareto|both] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from evomerge.search import recipe_of
from evomerge.search.config import load_evolve_config
from evomerge.search.run import SearchRun
from evomerge.search.store import prepare_run_dir
from evomerge.zoo import build_zoo, default_zoo_dir

SINGLE = ("cmaes", "tpe", "random")
PARETO = ("nsga2", "random")


def write_config(
    path: Path, zoo: Path, *, optimizer: str, seed: int, candidates: int, tasks: Sequence[str], pareto: bool
) -> Path:
    """An evolve config for one (optimizer, seed) run of the demo genome."""
    models = zoo / "models"
    config = {
        "name": path.stem,
        "base_model": str(models / "base"),
        "parents": [str(models / name) for name in ("math", "language", "strings")],
        "method": "dare_ties",
        "genome": {
            "density": {"bounds": [0.1, 1.0], "init": 0.9},
            "weight": {"bounds": [0.0, 1.5], "granularity": "per_layer"},
        },
        "objectives": [{"task": str(zoo / "tasks" / f"{task}.yaml")} for task in tasks],
        "combine": "pareto" if pareto else "weighted",
        "budget": {"candidates": candidates},
        "optimizer": optimizer,
        "racing": {"enabled": False},
        "seed": seed,
        "cpu_threads": 1,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_search(config_path: Path, run_dir: Path) -> SearchRun:
    """Run one search to its budget in-process (no selection, no test scoring: this script does its own)."""
    config, root = load_evolve_config(config_path)
    prepare_run_dir(config, run_dir)
    run = SearchRun(config, root, run_dir)
    run.run()
    return run


def evaluated_in_order(run: SearchRun) -> list:
    """Finished candidates in the order they were asked (their index + 1 is the evaluations spent)."""
    return sorted(run.finished_trials(), key=lambda t: t.number)


def search(run_dir: Path, zoo: Path, *, optimizer: str, seed: int, candidates: int, tasks: Sequence[str],
           pareto: bool) -> tuple[SearchRun, list]:
    """One (optimizer, seed) search into `run_dir`: the run and its finished candidates in asked order."""
    config = write_config(run_dir.with_suffix(".yaml"), zoo, optimizer=optimizer, seed=seed, candidates=candidates,
                          tasks=tasks, pareto=pareto)
    run = run_search(config, run_dir)
    return run, evaluated_in_order(run)


def best_so_far(values: Sequence[float | None]) -> list[float]:
    """Running maximum of search fitness; a failed candidate (None) adds nothing."""
    curve, best = [], float("-inf")
    for value in values:
        if value is not None:
            best = max(best, value)
        curve.append(best)
    return curve


def incumbent_indices(values: Sequence[float | None], checkpoints: Sequence[int]) -> dict[int, int]:
    """For each checkpoint n, the index (among the first n candidates) of the best search fitness."""
    out = {}
    for n in checkpoints:
        scored = [(v, i) for i, v in enumerate(values[:n]) if v is not None]
        out[n] = max(scored, key=lambda pair: (pair[0], -pair[1]))[1]  # earliest of ties
    return out


def test_scores(run: SearchRun, trial) -> dict[str, float]:
    """One trial's per-task test-split scores (the recipe is merged again in memory)."""
    run.session.activate_candidate(recipe_of(trial))
    report = run.session.evaluate("test")
    return {name: score.score for name, score in report.scores.items()}


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """Evaluations (1-based) after which `curve` first reaches `target`, None if never."""
    return next((i + 1 for i, value in enumerate(curve) if value >= target), None)


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by maximised 2-D points above `reference` (sweep over x descending)."""
    area, best_y = 0.0, reference[1]
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if x > reference[0] and y > best_y:
            area += (x - reference[0]) * (y - best_y)
            best_y = y
    return area


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated maximised points."""
    def dominated(p, q):
        return q[0] >= p[0] and q[1] >= p[1] and q != p
    return [i for i, p in enumerate(points) if not any(dominated(p, q) for q in points)]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def single_objective(zoo: Path, work: Path, candidates: int, seeds: int, checkpoints: list[int]) -> dict:
    """Every optimizer × seed on `target`: search curves and the incumbents' test fitness."""
    results: dict[str, list[dict]] = {}
    for optimizer in SINGLE:
        for seed in range(seeds):
            started = time.perf_counter()
            run, trials = search(work / f"{optimizer}-{seed}", zoo, optimizer=optimizer, seed=seed,
                                 candidates=candidates, tasks=["target"], pareto=False)
            fitness = [t.fitness if t.state.name == "COMPLETE" else None for t in trials]
            incumbents = incumbent_indices(fitness, checkpoints)
            tested = {i: test_scores(run, trials[i])["target"] for i in sorted(set(incumbents.values()))}
            results.setdefault(optimizer, []).append({
                "seed": seed,
                "search_curve": best_so_far(fitness),
                "test_at": {n: tested[i] for n, i in incumbents.items()},
                "seconds": time.perf_counter() - started,
            })
            print(f"{optimizer} seed {seed}: best search {max(v for v in fitness if v is not None):.3f}, "
                  f"test of final incumbent {tested[incumbents[checkpoints[-1]]]:.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return results


def report_single(results: dict, checkpoints: list[int]) -> dict:
    """The median table and the CMA-ES vs random evaluations ratio."""
    print("\nmedian best TEST fitness (target) of the incumbent by search fitness, over seeds")
    print("evaluations | " + " | ".join(f"{o:>8}" for o in results))
    for n in checkpoints:
        print(f"{n:>11} | " + " | ".join(f"{median([r['test_at'][n] for r in runs]):8.3f}" for runs in results.values()))
    print("median best SEARCH fitness")
    for n in checkpoints:
        print(f"{n:>11} | " + " | ".join(
            f"{median([r['search_curve'][n - 1] for r in runs]):8.3f}" for runs in results.values()))
    summary = {}
    medians = {o: [median(c) for c in zip(*(r["search_curve"] for r in runs), strict=True)] for o, runs in results.items()}
    random_final = medians["random"][-1]
    for optimizer in results:
        reach = first_reaching(medians[optimizer], random_final)
        summary[optimizer] = reach
        shown = "never" if reach is None else f"{reach} ({reach / len(medians['random']):.2f}x random's budget)"
        print(f"{optimizer}: evaluations for the median curve to reach random's median final best "
              f"search fitness {random_final:.3f}: {shown}")
    per_seed = [first_reaching(c["search_curve"], r["search_curve"][-1])
                for c, r in zip(results["cmaes"], results["random"], strict=True)]
    print(f"per seed, CMA-ES evaluations to reach that seed's random final best: {per_seed}")
    return {"reach_random_final": summary, "per_seed_cmaes": per_seed, "median_curves": medians}


def two_objective(zoo: Path, work: Path, candidates: int, seeds: int, checkpoints: list[int]) -> dict:
    """NSGA-II vs random on (add, translate): search hypervolume over time, test front at the end."""
    results: dict[str, list[dict]] = {}
    for optimizer in PARETO:
        for seed in range(seeds):
            started = time.perf_counter()
            run, trials = search(work / f"p-{optimizer}-{seed}", zoo, optimizer=optimizer, seed=seed,
                                 candidates=candidates, tasks=["add", "translate"], pareto=True)
            points = [tuple(t.values) if t.state.name == "COMPLETE" else None for t in trials]
            search_hv = {n: hypervolume_2d([p for p in points[:n] if p is not None]) for n in checkpoints}
            scored = [(i, p) for i, p in enumerate(points) if p is not None]
            front = [scored[j][0] for j in pareto_front([p for _, p in scored])]
            test_points = []
            for i in front:
                scores = test_scores(run, trials[i])
                test_points.append((scores["add"], scores["translate"]))
            results.setdefault(optimizer, []).append({
                "seed": seed, "search_hv": search_hv, "front_size": len(front),
                "test_hv": hypervolume_2d(test_points),
                "test_best_mean": max((a + b) / 2 for a, b in test_points),
                "seconds": time.perf_counter() - started,
            })
            print(f"{optimizer} seed {seed}: search HV {search_hv[checkpoints[-1]]:.4f}, front {len(front)}, "
                  f"test HV {results[optimizer][-1]['test_hv']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print("\nmedian search-split hypervolume (add x translate, reference (0, 0)), over seeds")
    print("evaluations | " + " | ".join(f"{o:>8}" for o in results))
    for n in checkpoints:
        print(f"{n:>11} | " + " | ".join(f"{median([r['search_hv'][n] for r in runs]):8.4f}" for runs in results.values()))
    for optimizer, runs in results.items():
        print(f"{optimizer}: final front on TEST: median hypervolume {median([r['test_hv'] for r in runs]):.4f}, "
              f"median best equal-weight mean {median([r['test_best_mean'] for r in runs]):.3f}")
    return results


def checkpoints_for(candidates: int) -> list[int]:
    """Budgets at which the incumbent is reported: eighths, quarters, halves and the full budget."""
    return sorted({max(1, candidates // d) for d in (8, 4, 2, 1)})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None,
                        help="zoo directory (default: the demo's, built once into the cache)")
    parser.add_argument("--candidates", type=int, default=100, help="evaluations per single-objective run")
    parser.add_argument("--pareto-candidates", type=int, default=160, help="evaluations per two-objective run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--part", choices=("single", "pareto", "both"), default="both")
    parser.add_argument("--out", type=Path, default=None, help="write every curve as JSON here")
    args = parser.parse_args(argv)
    args.zoo = args.zoo or build_zoo(default_zoo_dir()).root
    output: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="search-eff-") as tmp:
        work = Path(tmp)
        if args.part in ("single", "both"):
            checkpoints = checkpoints_for(args.candidates)
            single = single_objective(args.zoo, work, args.candidates, args.seeds, checkpoints)
            output["single"] = {"runs": single, "summary": report_single(single, checkpoints)}
        if args.part in ("pareto", "both"):
            checkpoints = checkpoints_for(args.pareto_candidates)
            output["pareto"] = two_objective(args.zoo, work, args.pareto_candidates, args.seeds, checkpoints)
    if args.out is not None:
        args.out.write_text(json.dumps(output, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
