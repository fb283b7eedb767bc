"""Parents chosen from a pool: does the search pick the three specialists over three distractors?

Per seed, two closed-loop searches on the demo problem (tiny zoo, `target` task, the demo genome and
defaults) with the same number of candidates:

- hand-picked: `parents` = the three specialists (the demo as shipped);
- pool: `parents_pool` = the three specialists and the three distractors of `evomerge.zoo.pool`
  (an irrelevant-skill specialist, a model pretrained from another initialisation, a degraded copy of
  the math specialist), interleaved, with `max_parents: 3`.

Reported: what the screen rejected, which pool models each pool champion merges, in how many seeds they
are exactly the three specialists, and the champions' test scores, compared pair by pair on the same
test examples (`evomerge.evaluate.stats.paired_comparison`, per seed and pooled over seeds).

    python benchmarks/pool_selection.py [--candidates 60] [--seeds 0 1 2 3 4] [--out pool.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evomerge.evaluate.stats import paired_comparison
from evomerge.pipelines.demo import demo_config
from evomerge.search.config import parse_evolve_config
from evomerge.search.run import SearchRun
from evomerge.search.store import prepare_run_dir, recipe_of
from evomerge.zoo import build_zoo, default_zoo_dir
from evomerge.zoo.pool import build_pool_zoo


def run_search(data: dict, run_dir: Path) -> SearchRun:
    config, root = parse_evolve_config(data, source="benchmark config", root=run_dir)
    prepare_run_dir(config, run_dir)
    run = SearchRun(config, root, run_dir)
    run.run()
    return run


def champion(run: SearchRun):
    return next(r for r in run.store.trials() if r.number == run.store.champion())


def test_values(run: SearchRun, record) -> list[float]:
    run.session.activate_candidate(run.session.candidate_of(record))
    (score,) = run.session.evaluate("test").scores.values()
    return score.values_in_example_order()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    zoo = build_zoo(default_zoo_dir("tiny", 0))
    distractors = build_pool_zoo(zoo).models
    specialists = {str(path) for path in zoo.specialists.values()}
    math_, language, strings = (str(zoo.specialists[n]) for n in ("math", "language", "strings"))
    pool = [str(distractors["backwards"]), math_, str(distractors["degraded"]), language,
            str(distractors["other_base"]), strings]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            hand = run_search(demo_config(zoo, candidates=args.candidates, seed=seed), Path(tmp) / f"hand-{seed}")
            data = demo_config(zoo, candidates=args.candidates, seed=seed)
            del data["parents"]
            data.update(parents_pool=pool, max_parents=3, name="pool")
            pooled_run = run_search(data, Path(tmp) / f"pool-{seed}")
            chosen = sorted(entry.model for entry in recipe_of(champion(pooled_run)).models)
            a, b = test_values(pooled_run, champion(pooled_run)), test_values(hand, champion(hand))
            comparison = paired_comparison(a, b, seed=seed)
            # How much the hand-picked champion leans on each parent: its mean layer weight per parent.
            params = champion(hand).params
            weights = {name: statistics.fmean(v for k, v in params.items() if k.startswith(f"weight.{name}."))
                       for name in ("math", "language", "strings")}
            result = {
                "seed": seed, "chosen": [Path(m).name for m in chosen], "specialists": set(chosen) == specialists,
                "rejected": {Path(m).name: why for m, why in pooled_run.session.pool_screen.rejected.items()},
                "test": {"pool": statistics.fmean(a), "hand": statistics.fmean(b)},
                "paired": comparison.to_dict(), "values": {"pool": a, "hand": b}, "hand_weights": weights,
            }
            results.append(result)
            print(f"seed {seed}: pool champion merges {result['chosen']} (rejected by the screen: "
                  f"{sorted(result['rejected'])}); test {result['test']['pool']:.3f} vs hand-picked "
                  f"{result['test']['hand']:.3f} (paired p {comparison.p_value:.3g}); hand-picked champion's mean "
                  f"weights {', '.join(f'{k} {v:.2f}' for k, v in weights.items())}", flush=True)
    a = [v for r in results for v in r["values"]["pool"]]
    b = [v for r in results for v in r["values"]["hand"]]
    comparison = paired_comparison(a, b)
    stderr = float(np.std(np.asarray(a) - np.asarray(b), ddof=1) / math.sqrt(len(a)))
    hits = sum(r["specialists"] for r in results)
    if args.out:
        args.out.write_text(json.dumps({"seeds": results, "delta": comparison.to_dict(), "stderr": stderr}, indent=1))
    print(f"pool: the three specialists chosen in {hits} of {len(results)} seeds, champion test delta "
          f"{comparison.difference:+.3f} (stderr {stderr:.3f}, paired p {comparison.p_value:.2g})")


if __name__ == "__main__":
    main()
