"""Estimated fitness (`fitness: {estimator: irt | subset, examples: K}`) against full-split fitness.

Per seed, two closed-loop CMA-ES searches on the demo problem (the tiny zoo's `target` task, the demo
genome, racing off) with the same number of candidates: one told full search-split fitness, one told
the estimate from K anchor examples (with its final audit of the top estimates). Reported:

- examples scored per candidate by the search itself (anchors, warm-up and audits included; the baselines,
  scored once by both, are not) and the saving factor full / estimated;
- Spearman rank correlation between the estimate each candidate was told and its full search-split
  fitness (every estimated candidate is scored on the whole split afterwards for this, outside the count);
  `--estimator subset` measures the plain anchor mean the same way, and `--anchor-answers likelihood` or
  `margin` answers the anchors with graded teacher-forced values instead of greedy 0/1 scores;
- the champion's test score against the full-fitness search's champion: per seed and pooled over seeds,
  a paired comparison (`evomerge.evaluate.stats.paired_comparison`) on the same test examples.

`--large` is the harder build: the same zoo and test split, but a search split of 1,800 examples, every
held-out row of the target's three skills (the `add`, `translate` and `reverse` tasks' search and test
splits, and the target's own search split, an even mix as the target is), so that K anchors are a small
share of the split as on real benchmarks. Nothing is retrained.

    python benchmarks/fitness_estimation.py [--zoo DIR] [--candidates 60] [--seeds 0 1 2] [--examples 30]
        [--estimator irt] [--anchor-answers margin] [--large] [--control] [--jobs 2]
        [--full-from EARLIER.json ...] [--no-spearman] [--out results.json]
    python benchmarks/fitness_estimation.py --combine RUN.json ... [--out pooled.json]

`--full-from` reuses the full searches of earlier `--out` files (the expensive half) to compare other
estimator settings against them; each seed first reruns that file's estimated search and stops unless it
is told exactly the same estimates, so a file from another zoo build or CPU is refused. `--combine` pools
the seeds of several runs of one setting (say seeds 0-9 and 10-19) into one summary and final line; the
mean Spearman is then over the seeds that measured it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from evomerge.evaluate.stats import paired_comparison
from evomerge.pipelines.demo import demo_config
from evomerge.search.config import Fitness, parse_evolve_config
from evomerge.search.run import SearchRun
from evomerge.search.store import prepare_run_dir
from evomerge.zoo import Zoo, build_zoo, default_zoo_dir

LARGE_SOURCES = ("add", "translate", "reverse")


def large_target(zoo: Zoo, out: Path, *, drop: int | None = None) -> Path:
    """The target task with a 1,800-example search split (module docstring) and the zoo's own test split;
    `drop`: without that search example (the control arm's split)."""
    spec = yaml.safe_load(zoo.target_task.read_text())
    tasks = zoo.target_task.parent
    rows = []
    for name in LARGE_SOURCES:
        for split in ("search", "test"):
            rows += (tasks / f"{name}_{split}.jsonl").read_text().splitlines()
    rows += (tasks / "target_search.jsonl").read_text().splitlines()
    if drop is not None:
        del rows[drop % len(rows)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "target_search.jsonl").write_text("\n".join(rows) + "\n")
    (out / "target_test.jsonl").write_text((tasks / "target_test.jsonl").read_text())
    spec["description"] = f"{spec['description']}; search split: every held-out row of {', '.join(LARGE_SOURCES)}"
    (out / "target.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return out / "target.yaml"


class NoisilyTold(SearchRun):
    """A search whose optimizer is told each fitness plus seeded Gaussian noise of sd `told_noise` (the
    noise control: how much a told value that ranks candidates imperfectly costs the search)."""

    told_noise = 0.0

    def attach(self, study):
        study = super().attach(study)
        rng, tell = np.random.default_rng(self.config.seed), study.tell

        def noisy_tell(trial, values=None, **kwargs):
            if values is not None:
                values = [value + rng.normal(0.0, self.told_noise) for value in values]
            return tell(trial, values, **kwargs)

        study.tell = noisy_tell
        return study


def run_search(
    zoo: Zoo, run_dir: Path, *, seed: int, candidates: int, fitness: dict, task: Path | None = None,
    told_noise: float = 0.0, population: int | None = None,
) -> SearchRun:
    """One closed-loop search on the demo problem, racing off so that `full` means the whole split;
    `population`: CMA-ES's population instead of its default."""
    data = demo_config(zoo, candidates=candidates, seed=seed)
    data.update(racing={"enabled": False}, fitness=fitness, name=f"estimation-{fitness['estimator']}")
    if population is not None:
        data["budget"] = {"candidates": candidates, "population": population}
    if task is not None:
        data["objectives"] = [{"task": str(task)}]
    config, root = parse_evolve_config(data, source="benchmark config", root=run_dir)
    prepare_run_dir(config, run_dir)
    if told_noise:
        run = NoisilyTold(config, root, run_dir)
        run.told_noise = told_noise
    else:
        run = SearchRun(config, root, run_dir)
    run.run()
    return run


def search_examples(run: SearchRun) -> int:
    """Examples the search scored for its candidates (audits included; raced/duplicates count what they used)."""
    return sum(r.examples or 0 for r in run.store.counted_trials())


def full_fitness(run: SearchRun, record) -> float:
    """A candidate's full search-split fitness (measurement only: not part of the search's count)."""
    if record.status == "complete":
        return record.fitness
    run.session.activate_candidate(run.session.candidate_of(record))
    scores = run.session.evaluate("search").scores
    return run.session.objectives.fitness({name: s.score for name, s in scores.items()})


def champion_test_values(run: SearchRun) -> list[float]:
    """The champion's per-example test values (one objective task), in example order."""
    record = next(r for r in run.store.trials() if r.number == run.store.champion())
    run.session.activate_candidate(run.session.candidate_of(record))
    (score,) = run.session.evaluate("test").scores.values()
    return score.values_in_example_order()


def estimated_records(run: SearchRun) -> list:
    """The candidates told an estimate, in candidate order (failed candidates have none)."""
    return [r for r in run.store.counted_trials() if r.estimate is not None]


def told_estimates(run: SearchRun) -> list[float]:
    """The estimate each estimated candidate was told, in candidate order."""
    return [r.estimate["fitness"] for r in estimated_records(run)]


def check_reproduces(stored: dict, rerun: SearchRun, seed: int) -> None:
    """Check that an earlier run's full search can stand in for this build's (`--full-from`): `rerun`, its
    estimated search run again here with its settings, must be told exactly the estimates it was told
    then, which holds only on the same zoo weights and kernels (trained weights differ between CPUs)."""
    if told_estimates(rerun) != stored["seed"]["told"]:
        raise SystemExit(f"--full-from: seed {seed}'s estimated search does not reproduce {stored['file']} here "
                         "(another zoo build or CPU); run the full searches instead")


def one_seed(zoo: Zoo, work: Path, seed: int, candidates: int, estimator: dict, task: Path | None,
             control: bool, control_noise: float, population: int | None, stored: dict | None = None,
             spearman: bool = True) -> dict:
    """Both searches of one seed; `stored`: the full search comes from an earlier run's results (checked by
    `check_reproduces`); `spearman`: also score every estimated candidate on the whole split."""
    estimated = run_search(zoo, work / f"est-{seed}", seed=seed, candidates=candidates, fitness=estimator, task=task,
                           population=population)
    if stored is None:
        full = run_search(zoo, work / f"full-{seed}", seed=seed, candidates=candidates,
                          fitness={"estimator": "full"}, task=task, population=population)
        b = champion_test_values(full)
        full_examples = search_examples(full)
        full_best = max(r.fitness for r in full.store.fully_evaluated())
    else:
        # With the file's own settings the estimated search above is the rerun; otherwise run it.
        rerun = estimated if Fitness(**estimator) == Fitness(**stored["settings"]) else run_search(
            zoo, work / f"check-{seed}", seed=seed, candidates=candidates, fitness=stored["settings"], task=task,
            population=population)
        check_reproduces(stored, rerun, seed)
        b = stored["seed"]["values"]["full"]
        full_examples = stored["seed"]["examples_per_candidate"]["full"] * candidates
        full_best = stored["seed"]["best_full_fitness"]["full_search"]
    told = told_estimates(estimated)
    truth = [full_fitness(estimated, r) for r in estimated_records(estimated)] if spearman else []
    est_examples = search_examples(estimated)
    a = champion_test_values(estimated)
    comparison = paired_comparison(a, b, seed=seed)
    extra = {}
    if control:
        # A second full-fitness search whose split lacks one of its 1,800 examples: it is told practically
        # the same fitness, so how far its champion lands from the full search's is the search's own spread.
        # With `control_noise` it is told that fitness plus noise: what imprecise ranking alone costs.
        dropped = large_target(zoo, work / f"control-task-{seed}", drop=seed)
        twin = run_search(zoo, work / f"control-{seed}", seed=seed, candidates=candidates,
                          fitness={"estimator": "full"}, task=dropped, told_noise=control_noise,
                          population=population)
        c = champion_test_values(twin)
        extra = {"control": {"champion_test": statistics.fmean(c), "values": c,
                             "paired_vs_full": paired_comparison(c, b, seed=seed).to_dict(),
                             "best_full_fitness": max(r.fitness for r in twin.store.fully_evaluated())}}
    return extra | {
        "seed": seed, "candidates": candidates,
        "examples_per_candidate": {"full": full_examples / candidates, "estimated": est_examples / candidates},
        "saving": full_examples / est_examples,
        "spearman": float(spearmanr(told, truth).statistic) if spearman else None,
        "estimate_rmse": (math.sqrt(statistics.fmean((t - f) ** 2 for t, f in zip(told, truth, strict=True)))
                          if spearman else None),
        "champion_test": {"estimated": statistics.fmean(a), "full": statistics.fmean(b)},
        "paired": comparison.to_dict(), "values": {"estimated": a, "full": b},
        "audited": sorted(estimated.store.audits), "told": told, "full_fitness": truth,
        "best_full_fitness": {"estimated_search": max(truth, default=None), "full_search": full_best},
    }


def pooled(results: Sequence[dict]) -> dict:
    """Over seeds: total saving, mean Spearman, and one paired comparison over every (seed, test example);
    with control searches, theirs against the full and the estimated searches' too."""
    a = [v for r in results for v in r["values"]["estimated"]]
    b = [v for r in results for v in r["values"]["full"]]
    comparison = paired_comparison(a, b)
    differences = np.asarray(a) - np.asarray(b)
    per_seed = [r["champion_test"]["estimated"] - r["champion_test"]["full"] for r in results]
    summary = {
        "saving": statistics.fmean(r["saving"] for r in results),
        # Over the seeds that measured it (`--combine` may pool runs with and without `--no-spearman`).
        "spearman": statistics.fmean(rhos) if (rhos := [r["spearman"] for r in results if r["spearman"] is not None])
        else None,
        "spearman_seeds": len(rhos),
        "delta": comparison.difference, "p": comparison.p_value,
        "stderr_paired": float(differences.std(ddof=1) / math.sqrt(len(differences))),
        "stderr_over_seeds": statistics.stdev(per_seed) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else None,
    }
    if all("control" in r for r in results):
        twins = [v for r in results for v in r["control"]["values"]]
        summary["control"] = {"vs_full": paired_comparison(twins, b).to_dict(),
                              "estimated_vs_control": paired_comparison(a, twins).to_dict()}
    return summary


def fmt(value: float | None) -> str:
    """Three decimals, or `n/a` for what `--no-spearman` did not measure."""
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, default=30)
    parser.add_argument("--estimator", choices=["irt", "subset"], default="irt")
    parser.add_argument("--anchors", choices=["clustered", "stratified"], default="stratified")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--audit-top-k", type=int, default=3)
    parser.add_argument("--anchor-answers", choices=["generated", "likelihood", "margin", "margin_if_right"], default="generated")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once")
    parser.add_argument("--large", action="store_true", help="the 1,800-example search split (module docstring)")
    parser.add_argument("--control", action="store_true",
                        help="also a full search on the large split less one example (the search's own spread)")
    parser.add_argument("--control-noise", type=float, default=0.0,
                        help="the control search is told its fitness plus Gaussian noise of this sd")
    parser.add_argument("--population", type=int, default=None, help="CMA-ES population of every search")
    parser.add_argument("--full-from", type=Path, nargs="+", default=[],
                        help="take the full searches from these earlier --out files instead of running them "
                             "(checked: their estimated searches must reproduce here)")
    parser.add_argument("--no-spearman", action="store_true",
                        help="skip scoring every estimated candidate on the whole split (the Spearman measurement)")
    parser.add_argument("--combine", type=Path, nargs="+", default=[],
                        help="run nothing: pool the seeds of these earlier --out files of one setting")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.combine:
        settings, large, results = combined(args.combine)
        report(results, settings, large, args.out)
        return
    if args.control and not args.large:
        parser.error("--control drops one example of the --large split; pass --large")
    if args.control_noise and not args.control:
        parser.error("--control-noise adds noise to the control search; pass --control")
    stored = {}
    for path in args.full_from:
        earlier = json.loads(path.read_text())
        if earlier["large"] == args.large:
            stored |= {r["seed"]: {"settings": earlier["settings"], "seed": r, "file": str(path)}
                       for r in earlier["seeds"] if r["candidates"] == args.candidates}
    if args.full_from and any(seed not in stored for seed in args.seeds):
        parser.error(f"--full-from has no full search of every seed with --candidates {args.candidates}"
                     f"{' and --large' if args.large else ' without --large'}")
    zoo = build_zoo(args.zoo or default_zoo_dir("tiny", 0))
    estimator = {"estimator": args.estimator, "examples": args.examples, "anchors": args.anchors,
                 "warmup": args.warmup, "audit_top_k": args.audit_top_k, "anchor_answers": args.anchor_answers}
    results = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        task = large_target(zoo, Path(tmp) / "large") if args.large else None
        # Seeds are independent searches (one CPU thread each): `--jobs` runs them side by side.
        futures = [pool.submit(one_seed, zoo, Path(tmp), seed, args.candidates, estimator, task, args.control,
                               args.control_noise, args.population, stored.get(seed), not args.no_spearman)
                   for seed in args.seeds]
        for seed, future in zip(args.seeds, futures, strict=True):
            result = future.result()
            results.append(result)
            print(f"seed {seed}: examples/candidate {result['examples_per_candidate']['estimated']:.1f} "
                  f"(full {result['examples_per_candidate']['full']:.0f}), saving {result['saving']:.1f}x, "
                  f"spearman {fmt(result['spearman'])}, estimate rmse {fmt(result['estimate_rmse'])}, champion test "
                  f"{result['champion_test']['estimated']:.3f} vs {result['champion_test']['full']:.3f} "
                  f"(paired p {result['paired']['p_value']:.3g})", flush=True)
            if args.control:
                print(f"seed {seed} control: full search on the split less one example (told noise sd "
                      f"{args.control_noise}), champion test {result['control']['champion_test']:.3f}", flush=True)
    report(results, estimator, args.large, args.out, control=args.control)


def combined(paths: Sequence[Path]) -> tuple[dict, bool, list[dict]]:
    """The settings, split and per-seed results of earlier --out files, which must share one estimator
    setting and split and hold each seed once."""
    runs = [json.loads(path.read_text()) for path in paths]
    first = runs[0]
    by_seed: dict[int, dict] = {}
    for path, run in zip(paths, runs, strict=True):
        if Fitness(**run["settings"]) != Fitness(**first["settings"]) or run["large"] != first["large"]:
            raise SystemExit(f"--combine: {path} has other settings than {paths[0]}; pool one setting at a time")
        for result in run["seeds"]:
            if result["seed"] in by_seed or result["candidates"] != first["seeds"][0]["candidates"]:
                raise SystemExit(f"--combine: seed {result['seed']} of {path} is already pooled, or has "
                                 "another number of candidates")
            by_seed[result["seed"]] = result
    return first["settings"], first["large"], [by_seed[seed] for seed in sorted(by_seed)]


def report(results: list[dict], settings: dict, large: bool, out: Path | None, *, control: bool = False) -> None:
    """The pooled summary over `results`, printed (the last line is the benchmark's) and written to `out`."""
    summary = pooled(results)
    if control:
        for name, label in (("vs_full", "control vs full"), ("estimated_vs_control", "estimated vs control")):
            c = summary["control"][name]
            print(f"pooled {label}: champion test delta {c['difference']:+.3f} (paired p {c['p_value']:.2g})")
    if out:
        out.write_text(json.dumps({"settings": settings, "large": large, "seeds": results, "pooled": summary}, indent=1))
    print(f"pooled over {len(results)} seeds: champion test delta stderr {summary['stderr_paired']:.3f} (paired, "
          f"per example), {summary['stderr_over_seeds'] or float('nan'):.3f} (over seeds); spearman measured on "
          f"{summary['spearman_seeds']} of them")
    print(f"estimation: saving {summary['saving']:.1f}x at spearman {fmt(summary['spearman'])}, "
          f"champion test delta {summary['delta']:+.3f} (paired p {summary['p']:.2g})")


if __name__ == "__main__":
    main()
