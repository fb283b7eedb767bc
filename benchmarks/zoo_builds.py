"""Does the zoo's scientific property hold on every build? Zoo seeds x CPU kernel sets, the demo on each.

Float rounding differs between CPU instruction sets, so a zoo built on another machine has other weights.
This script builds the zoo and runs the full demo (400 candidates) for every (ATEN_CPU_CAPABILITY, seed)
pair, each in a fresh cache and its own process, and tabulates on the target's test split: parents,
untuned baselines, the champion, the champion's paired comparison (exact McNemar) with the best parent and
the best untuned baseline, and each specialist's margin over the base on its own skill.

    python benchmarks/zoo_builds.py --seeds 0 1 2 3 4 --capabilities default avx2 --out /tmp/zoo-builds

Prints a Markdown table (per build, then mean ± sd) and writes builds.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PARENTS = ("base", "math", "language", "strings")
BASELINES = ("task_arithmetic_uniform", "ties_defaults", "dare_ties_defaults")


def one_build(seed: int, out: Path, candidates: int, psdfs_candidates: int) -> dict:
    """Zoo + demo (+ PS+DFS on its champion) + own-skill evaluation for one seed, in this process (its
    kernels are the build's)."""
    import torch
    import yaml

    from evomerge.evaluate import Evaluator, load_causal_lm, load_task
    from evomerge.evaluate.stats import paired_comparison
    from evomerge.pipelines import evolve
    from evomerge.pipelines.demo import run_demo
    from evomerge.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir("tiny", seed), seed=seed)
    outcome, summary = run_demo(out / "demo", candidates=candidates, seed=seed, zoo_dir=zoo.root)
    psdfs = None
    if psdfs_candidates:
        # The PS+DFS setting of benchmarks/RESULTS.md: the demo's champion is model A, the specialists follow.
        config = {
            "name": "psdfs",
            "dfs": {
                "sources": [str(path) for path in zoo.specialists.values()], "ps_run": str(outcome.run_dir),
                "repeats": 2, "max_path_length": 12, "scaling": "factorized",
            },
            "objectives": [{"task": str(zoo.target_task)}],
            "budget": {"candidates": psdfs_candidates},
            "optimizer": "cmaes", "seed": seed, "cpu_threads": 1,
        }
        (out / "psdfs.yaml").write_text(yaml.safe_dump(config))
        psdfs_outcome = evolve(out / "psdfs.yaml", out / "psdfs")
        task = zoo.target_task.stem
        ps = outcome.test_results[summary["champion"]]["test"][task]
        both = psdfs_outcome.test_results[f"candidate:{psdfs_outcome.selection.champion}"]["test"][task]
        psdfs = {
            "ps": ps["score"], "psdfs": both["score"],
            "psdfs_vs_ps": paired_comparison(both["values"], ps["values"]).to_dict(),
            "path": psdfs_outcome.test_results[f"candidate:{psdfs_outcome.selection.champion}"].get("trial"),
        }
    skills = {}
    for name, path in {"base": zoo.base, **zoo.specialists}.items():
        model, tokenizer = load_causal_lm(path, device="cpu", dtype=torch.float32)
        tasks = [load_task(zoo.tasks[skill]) for skill in zoo.skills.values()]
        report = Evaluator(tokenizer, tasks, split="test", device="cpu", batch_size=512).evaluate(model)
        skills[name] = {task: report[task].score for task in zoo.skills.values()}
    margins = {name: skills[name][skill] - skills["base"][skill] for name, skill in zoo.skills.items()}
    return {"seed": seed, "summary": summary, "skills": skills, "own_skill_margin": margins, "psdfs": psdfs}


def run_all(
    seeds: list[int], capabilities: list[str], out: Path, candidates: int, psdfs_candidates: int, jobs: int
) -> list[dict]:
    def launch(pair: tuple[str, int]) -> dict:
        capability, seed = pair
        build_dir = out / capability / f"seed{seed}"
        result_file = build_dir / "build.json"
        if not result_file.exists():
            build_dir.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "EVOMERGE_CACHE": str(out / capability / "cache")}
            if capability != "native":
                env["ATEN_CPU_CAPABILITY"] = capability
            command = [
                sys.executable, __file__, "--one", str(seed), "--out", str(build_dir),
                "--candidates", str(candidates), "--psdfs-candidates", str(psdfs_candidates),
            ]
            with (build_dir / "log.txt").open("w") as log:
                subprocess.run(command, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        return {"capability": capability, **json.loads(result_file.read_text())}

    pairs = [(capability, seed) for seed in seeds for capability in capabilities]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(launch, pairs))


def table(builds: list[dict]) -> str:
    def score(build: dict, name: str) -> float:
        task = build["summary"]["target_task"]
        tests = build["summary"]["test"]
        key = name if name in tests else f"parent:{name}"
        if name == "champion":
            key = build["summary"]["champion"]
        return tests[key][task]["score"]

    columns = [*PARENTS, *BASELINES, "champion"]
    header = (
        "| CPU kernels | seed | " + " | ".join(columns) + " | champion − best parent (p) | champion − best baseline (p) "
        "| min own-skill margin |"
    )
    lines = [header, "|" + "---|" * (len(columns) + 5)]
    rows: dict[str, list[float]] = {column: [] for column in [*columns, "vs_parent", "vs_baseline", "margin"]}
    for build in builds:
        comparison = build["summary"]["comparison"]
        cells = [f"{score(build, column):.3f}" for column in columns]
        for column in columns:
            rows[column].append(score(build, column))
        parent, baseline = comparison["best_parent"], comparison["best_baseline"]
        margin = min(build["own_skill_margin"].values())
        rows["vs_parent"].append(parent["difference"])
        rows["vs_baseline"].append(baseline["difference"])
        rows["margin"].append(margin)
        lines.append(
            f"| {build['capability']} | {build['seed']} | " + " | ".join(cells)
            + f" | {parent['difference']:+.3f} ({parent['p_value']:.1e}) | {baseline['difference']:+.3f} "
            f"({baseline['p_value']:.1e}) | {margin:.2f} |"
        )

    def mean_sd(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {sd:.3f}"

    lines.append(
        "| **mean ± sd** | | " + " | ".join(mean_sd(rows[column]) for column in columns)
        + f" | {mean_sd(rows['vs_parent'])} | {mean_sd(rows['vs_baseline'])} | {mean_sd(rows['margin'])} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2"], help="ATEN_CPU_CAPABILITY values; 'native' = unset")
    parser.add_argument("--out", type=Path, default=Path("/tmp/zoo-builds"))
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--psdfs-candidates", type=int, default=200, help="PS+DFS budget on each demo champion (0: skip)")
    parser.add_argument("--jobs", type=int, default=2, help="builds run side by side (each is single-threaded)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        result = one_build(args.one, args.out, args.candidates, args.psdfs_candidates)
        (args.out / "build.json").write_text(json.dumps(result, indent=2))
        return
    builds = run_all(args.seeds, args.capabilities, args.out, args.candidates, args.psdfs_candidates, args.jobs)
    (args.out / "builds.json").write_text(json.dumps(builds, indent=2))
    print(table(builds))


if __name__ == "__main__":
    main()
