"""Racing: examples scored per candidate with and without racing, and what the ranking loses.

A real candidate stream: a CMA-ES search on the default tiny zoo's `target` task (the demo genome:
DARE-TIES, one global density, one weight per layer and parent) with racing **off**, so every candidate is
scored on the whole search split; each candidate's per-example 0/1 values are recorded as it runs. Then
every racing setting is replayed over that stream in order with `evomerge.search.racing.race` — the
function `SearchRun` calls — with the entry threshold taken, as in a run, from the candidates the replay
itself completed. Per setting:

- examples scored (and the saving factor full / raced);
- Spearman rank correlation between the fitness the optimizer is told (the partial estimate for a
  raced-out candidate) and the full-split fitness, over all candidates and within the last generation;
- recall of the true top-k (the race's k) among the candidates racing completed, and whether the
  best completed candidate is the true best (what the champion selection sees).

Caveat: the replay is open-loop — the optimizer's trajectory is the no-racing one; with racing on, CMA-ES
would be told the noisier partial estimates and move differently.

    python benchmarks/racing.py [--zoo DIR] [--candidates 120] [--seed 0] [--out racing.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from scipy.stats import spearmanr

from evomerge.search.config import load_evolve_config
from evomerge.search.racing import entry_threshold, plan_race, race
from evomerge.search.run import CandidateResult, SearchRun
from evomerge.search.store import prepare_run_dir
from evomerge.zoo import build_zoo, default_zoo_dir

# (first_fraction, growth, z, top_k as a share of the population): growth 1e9 makes a single round
# after the first slice (the scheme before multi-round racing); top_k 0.5 is CMA-ES's parent count mu.
SETTINGS = [
    (0.25, 1e9, 2.0, 1.0),
    (0.25, 2.0, 2.0, 1.0),
    (0.125, 2.0, 2.0, 1.0),
    (0.0625, 2.0, 2.0, 1.0),
    (0.125, 2.0, 1.5, 1.0),
    (0.0625, 2.0, 1.5, 1.0),
    (0.125, 2.0, 3.0, 1.0),
    (0.125, 4.0, 2.0, 1.0),
    (0.125, 2.0, 2.0, 0.5),
    (0.0625, 2.0, 2.0, 0.5),
    (0.0625, 2.0, 1.5, 0.5),
    (0.0625, 2.0, 1.0, 0.5),
]


def weighted_mean(values: dict[str, list[float]], weights: dict[str, float]) -> float:
    """The weighted-sum fitness of per-task mean scores (what a raced-out candidate is told with)."""
    return sum(w * sum(values[task]) / len(values[task]) for task, w in weights.items())


@dataclass(frozen=True)
class Candidate:
    """One evaluated candidate of the stream: every task's per-example values on the full search split."""

    number: int
    values: dict[str, list[float]]  # indexed by example index

    def fitness(self, weights: dict[str, float]) -> float:
        return weighted_mean(self.values, weights)


def write_config(path: Path, zoo: Path, candidates: int, seed: int, racing: bool = False) -> Path:
    """The demo problem; racing off (every candidate scored on the whole split) or at its defaults."""
    models = zoo / "models"
    path.write_text(yaml.safe_dump({
        "name": "racing-stream", "base_model": str(models / "base"),
        "parents": [str(models / name) for name in ("math", "language", "strings")],
        "method": "dare_ties",
        "genome": {"density": {"bounds": [0.1, 1.0], "init": 0.9},
                   "weight": {"bounds": [0.0, 1.5], "granularity": "per_layer"}},
        "objectives": [{"task": str(zoo / "tasks" / "target.yaml")}],
        "budget": {"candidates": candidates}, "optimizer": "cmaes", "racing": {"enabled": racing},
        "seed": seed, "cpu_threads": 1,
    }, sort_keys=False))
    return path


def record_stream(config_path: Path, run_dir: Path) -> tuple[list[Candidate], int]:
    """Run the search, keeping each evaluated candidate's per-example values; returns them and the population."""
    config, root = load_evolve_config(config_path)
    prepare_run_dir(config, run_dir)
    run = SearchRun(config, root, run_dir)
    last: dict[str, list[float]] = {}
    evaluate = run.session.evaluate

    def recording_evaluate(split="search", indices=None):
        # The run scores each candidate with one whole-split call (racing is off): keep its values by index.
        report = evaluate(split, indices)
        last.clear()
        for name, score in report.scores.items():
            by_index = [0.0] * len(score.values)
            for i, value in zip(score.indices, score.values, strict=True):
                by_index[i] = value
            last[name] = by_index
        return report

    stream: list[Candidate] = []

    def keep(result: CandidateResult) -> None:
        if result.status == "complete":  # duplicates and failures were not evaluated
            stream.append(Candidate(result.number, {k: list(v) for k, v in last.items()}))

    run.session.evaluate = recording_evaluate
    run.on_candidate = keep
    run.run()
    return stream, run.popsize


def replay(
    stream: Sequence[Candidate], weights: dict[str, float], top_k: int, fraction: float, growth: float, z: float,
    seed: int, population: int,
) -> dict:
    """Race every candidate of the stream in order; what it cost and what the optimizer would be told."""
    sizes = {task: len(values) for task, values in stream[0].values.items()}
    plan = plan_race(sizes, fraction, seed, growth)
    completed: list[float] = []
    told, full, examples, kept = [], [], 0, []
    for candidate in stream:
        seen: dict[str, list[float]] = {}

        def score_round(indices: dict[str, list[int]], candidate: Candidate = candidate, seen=seen):
            for task, idx in indices.items():
                seen.setdefault(task, []).extend(candidate.values[task][i] for i in idx)
            return seen

        raced_out = race(plan, score_round, weights, entry_threshold(completed, top_k), z)
        estimate = weighted_mean(seen, weights)
        examples += sum(len(v) for v in seen.values())
        told.append(estimate)
        full.append(candidate.fitness(weights))
        kept.append(not raced_out)
        if not raced_out:
            completed.append(estimate)
    return summarise(told, full, kept, examples, sum(sizes.values()) * len(stream), top_k, population)


def replay_paired(
    stream: Sequence[Candidate], task: str, top_k: int, fraction: float, z: float, seed: int, population: int
) -> dict:
    """Experiment (not in `SearchRun`): race against the k-th best candidate **on the same examples**.

    The difference candidate − reference per example has a much smaller spread than either score when
    both solve mostly the same examples; one +1 and one −1 pseudo-difference keep its error positive. A
    raced-out candidate is told the reference's full fitness plus the mean difference. Single task only.
    """
    size = len(stream[0].values[task])
    plan = plan_race({task: size}, fraction, seed, 2.0)
    completed: list[Candidate] = []
    told, full, kept, examples = [], [], [], 0
    for candidate in stream:
        fitness = statistics.fmean(candidate.values[task])
        estimate, raced_out, used = fitness, False, size
        if len(completed) >= top_k:
            reference = sorted(completed, key=lambda c: -statistics.fmean(c.values[task]))[top_k - 1]
            scored: list[int] = []
            for r in range(plan.rounds - 1):
                scored += plan.round_indices(r).get(task, [])
                diffs = [candidate.values[task][i] - reference.values[task][i] for i in scored]
                mean = statistics.fmean(diffs)
                stderr = statistics.stdev(diffs + [1.0, -1.0]) / math.sqrt(len(diffs) + 2)
                if mean + z * stderr < 0:
                    estimate = statistics.fmean(reference.values[task]) + mean
                    raced_out, used = True, len(scored)
                    break
        examples += used
        told.append(estimate)
        full.append(fitness)
        kept.append(not raced_out)
        if not raced_out:
            completed.append(candidate)
    return summarise(told, full, kept, examples, size * len(stream), top_k, population)


def oracle_saving(full: Sequence[float], top_k: int, fraction: float) -> tuple[int, float]:
    """Upper bound: candidates truly below the k-th best so far, dropped after the first slice with certainty."""
    below = sum(1 for i, f in enumerate(full) if (t := entry_threshold(full[:i], top_k)) is not None and f < t)
    return below, len(full) / (len(full) - below * (1 - fraction))


def summarise(
    told: list[float], full: list[float], kept: list[bool], examples: int, total: int, top_k: int, population: int
) -> dict:
    """Saving factor, rank correlations, top-k recall and champion agreement of one replay."""
    true_top = set(sorted(range(len(full)), key=lambda i: -full[i])[:top_k])
    best_kept = max((i for i in range(len(full)) if kept[i]), key=lambda i: full[i])
    last = slice(len(full) - population, len(full))
    return {
        "examples": examples,
        "saving": total / examples,
        "raced_out": kept.count(False),
        "spearman_all": float(spearmanr(told, full).statistic),
        "spearman_last_generation": float(spearmanr(told[last], full[last]).statistic),
        "top_k_recall": len(true_top & {i for i, k in enumerate(kept) if k}) / top_k,
        "champion_regret": max(full) - full[best_kept],
    }


def closed_loop(zoo: Path, candidates: int, seed: int) -> dict:
    """The same search with racing on at its defaults: what it really saved and the best full fitness found."""
    with tempfile.TemporaryDirectory(prefix="racing-on-") as tmp:
        config_path = write_config(Path(tmp) / "racing-on.yaml", zoo, candidates, seed, racing=True)
        config, root = load_evolve_config(config_path)
        prepare_run_dir(config, Path(tmp) / "run")
        run = SearchRun(config, root, Path(tmp) / "run")
        run.run()
        trials = [t for t in run.finished_trials() if t.status in ("complete", "raced_out")]
        examples = sum(t.examples for t in trials)
        saved = sum(t.examples_saved for t in trials)
        return {
            "evaluated": len(trials),
            "raced_out": sum(t.status == "raced_out" for t in trials),
            "saving": (examples + saved) / examples,
            "best_full_fitness": max(t.fitness for t in trials if t.status == "complete"),
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None,
                        help="zoo directory (default: the demo's, built once into the cache)")
    parser.add_argument("--candidates", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", type=Path, default=None, help="reuse (or save) the recorded stream as JSON")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--closed-loop", action="store_true", help="also run the search with racing on (defaults)")
    args = parser.parse_args(argv)
    args.zoo = args.zoo or build_zoo(default_zoo_dir()).root
    if args.stream is not None and args.stream.exists():
        saved = json.loads(args.stream.read_text())
        stream = [Candidate(c["number"], c["values"]) for c in saved["stream"]]
        popsize = saved["population"]
    else:
        with tempfile.TemporaryDirectory(prefix="racing-") as tmp:
            config = write_config(Path(tmp) / "racing.yaml", args.zoo, args.candidates, args.seed)
            stream, popsize = record_stream(config, Path(tmp) / "run")
        if args.stream is not None:
            args.stream.write_text(json.dumps({"population": popsize, "stream": [c.__dict__ for c in stream]}))
    weights = dict.fromkeys(stream[0].values, 1.0)
    full = [c.fitness(weights) for c in stream]
    print(f"stream: {len(stream)} evaluated CMA-ES candidates, population {popsize}, "
          f"full fitness {min(full):.3f}..{max(full):.3f}; rho last = within the last {popsize} candidates")
    print(f"{'first':>6} {'growth':>6} {'z':>4} {'k':>3} | {'examples':>8} {'saving':>6} {'out':>4} | "
          f"{'rho all':>7} {'rho last':>8} | {'top-k':>5} {'regret':>6}")
    rows = []
    for fraction, growth, z, share in SETTINGS:
        top_k = max(1, round(share * popsize))
        row = replay(stream, weights, top_k, fraction, growth, z, args.seed, popsize)
        rows.append({"first_fraction": fraction, "growth": growth, "z": z, "top_k": top_k, **row})
        shown_growth = "1 rnd" if growth > 100 else f"{growth:g}"
        print(f"{fraction:6.4g} {shown_growth:>6} {z:4.1f} {top_k:3d} | {row['examples']:8d} {row['saving']:5.2f}x "
              f"{row['raced_out']:4d} | {row['spearman_all']:7.3f} {row['spearman_last_generation']:8.3f} | "
              f"{row['top_k_recall']:5.2f} {row['champion_regret']:6.3f}")
    for share in (1.0, 0.5):
        top_k = max(1, round(share * popsize))
        below, saving = oracle_saving(full, top_k, 0.125)
        print(f"oracle, k={top_k}: {below} candidates truly below the entry threshold; dropping each after 1/8 "
              f"of the split with certainty saves at most {saving:.2f}x")
    if len(weights) == 1:
        task = next(iter(weights))
        print("paired racing (experiment): difference to the k-th best candidate on the same examples, growth 2")
        for fraction, z, share in ((0.125, 2.0, 1.0), (0.125, 2.0, 0.5), (0.125, 1.5, 0.5), (0.0625, 1.5, 0.5)):
            top_k = max(1, round(share * popsize))
            row = replay_paired(stream, task, top_k, fraction, z, args.seed, popsize)
            rows.append({"paired": True, "first_fraction": fraction, "growth": 2.0, "z": z, "top_k": top_k, **row})
            print(f"{fraction:6.4g} {'2':>6} {z:4.1f} {top_k:3d} | {row['examples']:8d} {row['saving']:5.2f}x "
                  f"{row['raced_out']:4d} | {row['spearman_all']:7.3f} {row['spearman_last_generation']:8.3f} | "
                  f"{row['top_k_recall']:5.2f} {row['champion_regret']:6.3f}")
    result = {"population": popsize, "candidates": len(stream), "rows": rows}
    if args.closed_loop:
        result["closed_loop"] = closed_loop(args.zoo, len(stream), args.seed)
        print(f"closed loop, racing on at its defaults, same seed and budget: {result['closed_loop']}; "
              f"best full fitness without racing {max(full):.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
