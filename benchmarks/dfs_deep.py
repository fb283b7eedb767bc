"""Does data-flow-space search alone beat the best parent on a deeper zoo?

On the 4-layer tiny zoo it does not (benchmarks/RESULTS.md): there is little depth to recombine. This
script builds the tiny zoo's recipe with deeper models (a custom preset: the tiny shape and training with
`--layers` decoder layers; CPU-feasible, unlike `--size small`), then runs DFS alone over the three
specialists (the paper's setting: model A's layers first, indicator genes one CMA-ES step from the
threshold, scales on every transition) and compares the champion with the best parent on the target's
test split, paired on the same examples (exact McNemar).

    python benchmarks/dfs_deep.py --layers 8 --candidates 300 --population 24 --seeds 0 --out /tmp/dfs-deep

Prints one line per search seed and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from evomerge.evaluate.stats import paired_comparison
from evomerge.pipelines import evolve
from evomerge.search.store import find_trial, load_run
from evomerge.zoo import PRESETS, build_zoo


def deep_zoo(out: Path, layers: int, zoo_seed: int):
    tiny = PRESETS["tiny"]
    preset = dataclasses.replace(tiny, shape=dataclasses.replace(tiny.shape, num_layers=layers))
    return build_zoo(out / f"zoo-{layers}layers-seed{zoo_seed}", seed=zoo_seed, preset=preset)


def dfs_alone(zoo, out: Path, *, seed: int, candidates: int, population: int, layers: int) -> dict:
    config = {
        "name": "dfs-deep",
        "dfs": {
            # Model A first: the strongest specialist on the target's search split is not known before the
            # search, so the order is the zoo's (math, language, strings), as in the tiny-zoo measurement.
            "sources": [str(path) for path in zoo.specialists.values()],
            "repeats": 2, "max_path_length": 2 * layers, "scaling": "factorized",
        },
        "objectives": [{"task": str(zoo.target_task)}],
        "budget": {"candidates": candidates, "population": population},
        "optimizer": "cmaes", "seed": seed, "cpu_threads": 1,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dfs.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    outcome = evolve(out / "dfs.yaml", out / "run")
    task = zoo.target_task.stem
    champion = outcome.test_results[f"candidate:{outcome.selection.champion}"]
    _, store = load_run(outcome.run_dir)
    path = json.loads(find_trial(store, str(champion["trial"])).path)["path"]
    parents = {n: r["test"][task] for n, r in outcome.test_results.items() if r["kind"] == "parent"}
    best = max(parents, key=lambda n: parents[n]["score"])
    baselines = {n: r["test"][task]["score"] for n, r in outcome.test_results.items() if r["kind"] == "baseline"}
    return {
        "seed": seed,
        "champion": champion["test"][task]["score"],
        "parents": {n: p["score"] for n, p in parents.items()},
        "baselines": baselines,
        "best_parent": best,
        "vs_best_parent": paired_comparison(champion["test"][task]["values"], parents[best]["values"]).to_dict(),
        "steps": path["steps"],
        "scales": path["scales"],
        "sources_used": sorted({list(zoo.specialists)[source] for source, _ in path["steps"]}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--zoo-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--population", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    zoo = deep_zoo(args.out, args.layers, args.zoo_seed)
    results = []
    for seed in args.seeds:
        row = dfs_alone(
            zoo, args.out / f"dfs-seed{seed}", seed=seed, candidates=args.candidates,
            population=args.population, layers=args.layers,
        )
        results.append(row)
        comparison = row["vs_best_parent"]
        low, high = comparison["ci95"]
        print(
            f"seed {seed}: DFS {row['champion']:.3f} vs best parent {row['best_parent']} "
            f"{row['parents'][row['best_parent']]:.3f}: {comparison['difference']:+.3f} "
            f"(95% CI {low:+.3f} to {high:+.3f}, p {comparison['p_value']:.2g}); "
            f"path {len(row['steps'])} steps from {', '.join(row['sources_used'])}",
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
