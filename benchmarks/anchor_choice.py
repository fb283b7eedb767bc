"""Which anchors, and which anchor answers, rank candidates like their full search-split fitness?

One closed-loop full-fitness search (the demo problem, racing off; `--large`: the 1,800-example search
split of `fitness_estimation.py`) gives candidates along a real CMA-ES trajectory. Every candidate is then
scored on every search example three ways: its greedy answers (0/1, the task's scorer), the probability
it gives the reference answer (`likelihood`) and the product of its reference tokens' races against their
strongest rivals (`margin`; both `Evaluator.answer_probabilities`). First, how well each graded answer's
whole-split mean ranks candidates by accuracy (over all candidates and over the better half): what a
search told that answer optimises instead of accuracy. Then, offline, over `--repeats` draws of nine
candidates standing in for the parents and untuned merges the estimator fits on:

- Spearman between full fitness and each estimate of the other candidates: the anchor mean (`subset`) and
  the IRT ability (`irt`), for anchors drawn at random, `stratified` and `clustered`, answered each way;
- how much worse the best of the `--audit` best estimates is than the truly best candidate, on the search
  split (what the final audit loses on a fixed trajectory);
- the split-half reliability of the full fitness itself (Spearman-Brown), which bounds how well any
  estimate from a part of the split can rank candidates by the whole.

    python benchmarks/anchor_choice.py [--candidates 100] [--examples 90] [--audit 5] [--large] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fitness_estimation import large_target, run_search
from scipy.stats import spearmanr

from evomerge.search.irt import estimate_ability, fit_2pl, select_anchors
from evomerge.zoo import build_zoo, default_zoo_dir

FIT_ROWS = 9  # the parents and untuned merges of the demo problem: 4 parents + 5 baselines


def answers(run, records) -> dict[str, np.ndarray]:
    """(candidates x examples) answers on the search split: greedy 0/1, `likelihood` and `margin`."""
    tables: dict[str, list[list[float]]] = {"generated": [], "likelihood": [], "margin": []}
    everything = {name: list(range(size)) for name, size in run.session.sizes().items()}
    for record in records:
        run.session.activate_candidate(run.session.candidate_of(record))
        (score,) = run.session.evaluate("search").scores.values()
        tables["generated"].append(score.values_in_example_order())
        for kind in ("likelihood", "margin"):
            (graded,) = run.session.answer_probabilities(
                "search", everything, against_rival=kind == "margin"
            ).scores.values()
            tables[kind].append(graded.values_in_example_order())
    return {kind: np.array(rows) for kind, rows in tables.items()}


def reliability(greedy: np.ndarray, rng: np.random.Generator, draws: int = 200) -> float:
    """Spearman-Brown split-half reliability of the full-split accuracy across candidates."""
    halves = []
    for _ in range(draws):
        order = rng.permutation(greedy.shape[1])
        half = len(order) // 2
        halves.append(np.corrcoef(greedy[:, order[:half]].mean(1), greedy[:, order[half:]].mean(1))[0, 1])
    r = float(np.mean(halves))
    return 2 * r / (1 + r)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--examples", type=int, default=90)
    parser.add_argument("--audit", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--large", action="store_true")
    args = parser.parse_args(argv)
    zoo = build_zoo(default_zoo_dir("tiny", 0))
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        task = large_target(zoo, Path(tmp) / "large") if args.large else None
        run = run_search(zoo, Path(tmp) / "run", seed=args.seed, candidates=args.candidates,
                         fitness={"estimator": "full"}, task=task)
        records = [r for r in run.store.counted_trials() if r.fitness is not None]
        tables = answers(run, records)
    greedy = tables["generated"]
    full = greedy.mean(1)
    rel = reliability(greedy, rng)
    print(f"{len(records)} candidates, {greedy.shape[1]} search examples, full fitness sd {full.std():.3f}; "
          f"split-half reliability {rel:.3f} (an estimate that knew each candidate's expected accuracy would "
          f"rank at about {np.sqrt(rel):.3f} against full fitness)")
    better = np.argsort(full)[len(full) // 2 :]
    for kind in ("likelihood", "margin"):
        whole = tables[kind].mean(1)
        print(f"{kind} on the whole split ranks candidates by accuracy at Spearman "
              f"{spearmanr(whole, full).statistic:.3f} (better half: {spearmanr(whole[better], full[better]).statistic:.3f})")
    rho: dict[str, list[float]] = {}
    gaps = []
    for repeat in range(args.repeats):
        fitted = rng.choice(len(full), FIT_ROWS, replace=False)
        rest = np.setdiff1d(np.arange(len(full)), fitted)
        fit = fit_2pl(greedy[fitted])
        prior_mean, prior_sd = float(fit.theta.mean()), max(1.0, float(fit.theta.std()))
        draws = {
            "random": rng.choice(greedy.shape[1], args.examples, replace=False),
            "stratified": select_anchors(greedy[fitted], args.examples, seed=repeat, method="stratified"),
            "clustered": select_anchors(greedy[fitted], args.examples, seed=repeat, method="clustered"),
        }
        for method, items in draws.items():
            for kind, table in tables.items():
                subset = table[rest][:, items].mean(1)
                theta = [estimate_ability(fit, items, table[i, items], prior_mean=prior_mean, prior_sd=prior_sd)
                         for i in rest]
                rho.setdefault(f"subset {method} {kind}", []).append(spearmanr(subset, full[rest]).statistic)
                rho.setdefault(f"irt {method} {kind}", []).append(spearmanr(theta, full[rest]).statistic)
                if (method, kind) == ("stratified", "margin"):
                    audited = rest[np.argsort(theta)[::-1][: args.audit]]
                    gaps.append(full[rest].max() - full[audited].max())
    print(f"Spearman against full fitness, {args.examples} anchors, mean over {args.repeats} draws:")
    for name, values in rho.items():
        print(f"  {name:32s} {np.mean(values):.3f}")
    print(f"irt stratified margin: the best of the {args.audit} best estimates is {np.mean(gaps):.4f} below the "
          f"best candidate on the search split on average (0 in {np.mean(np.array(gaps) == 0):.0%} of draws)")


if __name__ == "__main__":
    main()
