"""Does the zoo's scientific property hold on every build? Zoo seeds x CPU kernel sets, the demo on each.

Float rounding differs between CPU instruction sets, so a zoo built on another machine has other weights.
This script builds the zoo and runs the full demo (400 candidates) for every (ATEN_CPU_CAPABILITY, seed)
pair, each in a fresh cache and its own process, and tabulates on the target's test split: parents,
untuned baselines, the champion, the champion's paired comparison (exact McNemar) with the best parent and
the best untuned baseline, the champion from the other CMA-ES start (`start: init` against
`start: best_baseline`, same budget, paired), PS+DFS on the champion, and each specialist's margin over
the base on its own skill.

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
BASELINES = (
    "task_arithmetic_uniform", "ties_density0.5_weight0.5", "ties_density0.5_weight1",
    "dare_ties_density0.5_weight0.5", "dare_ties_density0.5_weight1",
)
STARTS = ("init", "best_baseline")


def one_build(seed: int, out: Path, candidates: int, psdfs_candidates: int) -> dict:
    """Zoo + the demo from both CMA-ES starts (+ PS+DFS on the demo's champion) + own-skill evaluation for
    one seed, in this process (its kernels are the build's)."""
    import torch
    import yaml

    from evomerge.evaluate import Evaluator, load_causal_lm, load_task
    from evomerge.evaluate.stats import paired_comparison
    from evomerge.pipelines import evolve
    from evomerge.pipelines.demo import DEMO_START, run_demo
    from evomerge.search.store import find_trial, load_run
    from evomerge.zoo import build_zoo, default_zoo_dir

    zoo = build_zoo(default_zoo_dir("tiny", seed), seed=seed)
    task = zoo.target_task.stem
    outcomes, summaries = {}, {}
    for start in STARTS:
        outcomes[start], summaries[start] = run_demo(
            out / f"demo-{start}", candidates=candidates, seed=seed, start=start, zoo_dir=zoo.root
        )
    outcome, summary = outcomes[DEMO_START], summaries[DEMO_START]
    other = next(start for start in STARTS if start != DEMO_START)
    starts = paired_comparison(
        outcome.test_results[summary["champion"]]["test"][task]["values"],
        outcomes[other].test_results[summaries[other]["champion"]]["test"][task]["values"],
    ).to_dict()
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
        champion = psdfs_outcome.test_results[f"candidate:{psdfs_outcome.selection.champion}"]
        _, store = load_run(out / "psdfs")
        path = json.loads(find_trial(store, str(champion["trial"])).path)["path"]
        ps = outcome.test_results[summary["champion"]]["test"][task]
        parents = {n: r["test"][task] for n, r in outcome.test_results.items() if r["kind"] == "parent"}
        best_parent = max(parents, key=lambda n: parents[n]["score"])
        values = champion["test"][task]["values"]
        psdfs = {
            "ps": ps["score"], "psdfs": champion["test"][task]["score"], "steps": path["steps"],
            "sources_used": sorted({source for source, _ in path["steps"]}), "scales": path["scales"],
            "psdfs_vs_ps": paired_comparison(values, ps["values"]).to_dict(),
            "psdfs_vs_best_parent": {"name": best_parent, **paired_comparison(values, parents[best_parent]["values"]).to_dict()},
        }
    skills = {}
    for name, path in {"base": zoo.base, **zoo.specialists}.items():
        model, tokenizer = load_causal_lm(path, device="cpu", dtype=torch.float32)
        tasks = [load_task(zoo.tasks[skill]) for skill in zoo.skills.values()]
        report = Evaluator(tokenizer, tasks, split="test", device="cpu", batch_size=512).evaluate(model)
        skills[name] = {task: report[task].score for task in zoo.skills.values()}
    margins = {name: skills[name][skill] - skills["base"][skill] for name, skill in zoo.skills.items()}
    return {
        "seed": seed, "summary": summary, "other_start": {"start": other, "summary": summaries[other]},
        "start_comparison": starts, "skills": skills, "own_skill_margin": margins, "psdfs": psdfs,
    }


def run_all(
    seeds: list[int], capabilities: list[str], out: Path, candidates: int, psdfs_candidates: int,
    psdfs_seeds: list[int], jobs: int,
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
                "--candidates", str(candidates),
                "--psdfs-candidates", str(psdfs_candidates if seed in psdfs_seeds else 0),
            ]
            with (build_dir / "log.txt").open("w") as log:
                subprocess.run(command, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        return {"capability": capability, **json.loads(result_file.read_text())}

    pairs = [(capability, seed) for seed in seeds for capability in capabilities]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(launch, pairs))


def table(builds: list[dict]) -> str:
    """Per build and mean ± sd: target test scores, the champion's paired comparisons, the other start,
    PS+DFS, and the smallest own-skill margin of a specialist over the base."""

    def score(summary: dict, name: str) -> float:
        task = summary["target_task"]
        key = summary["champion"] if name == "champion" else name if name in summary["test"] else f"parent:{name}"
        return summary["test"][key][task]["score"]

    columns = [*PARENTS, *BASELINES, "champion"]
    extra = ["vs best parent", "vs best baseline", "other start", "PS+DFS", "min own-skill margin"]
    lines = [
        "| CPU kernels | seed | " + " | ".join(columns + extra) + " |",
        "|" + "---|" * (len(columns) + len(extra) + 2),
    ]
    values: dict[str, list[float]] = {column: [] for column in columns + extra}
    for build in builds:
        summary, comparison = build["summary"], build["summary"]["comparison"]
        cells = []
        for column in columns:
            values[column].append(score(summary, column))
            cells.append(f"{values[column][-1]:.3f}")
        for label, key in (("vs best parent", "best_parent"), ("vs best baseline", "best_baseline")):
            values[label].append(comparison[key]["difference"])
            cells.append(f"{comparison[key]['difference']:+.3f} (p {comparison[key]['p_value']:.1e})")
        other = build["start_comparison"]
        values["other start"].append(score(build["other_start"]["summary"], "champion"))
        cells.append(f"{values['other start'][-1]:.3f} (diff {other['difference']:+.3f}, p {other['p_value']:.2f})")
        psdfs = build.get("psdfs")
        if psdfs:
            values["PS+DFS"].append(psdfs["psdfs"])
            cells.append(f"{psdfs['psdfs']:.3f} ({psdfs['psdfs_vs_ps']['difference']:+.3f}, p {psdfs['psdfs_vs_ps']['p_value']:.2f})")
        else:
            cells.append("-")
        values["min own-skill margin"].append(min(build["own_skill_margin"].values()))
        cells.append(f"{values['min own-skill margin'][-1]:.2f}")
        lines.append(f"| {build['capability']} | {build['seed']} | " + " | ".join(cells) + " |")

    def mean_sd(series: list[float]) -> str:
        if not series:
            return "-"
        sd = statistics.stdev(series) if len(series) > 1 else 0.0
        return f"{statistics.fmean(series):.3f} ± {sd:.3f}"

    lines.append("| **mean ± sd** | | " + " | ".join(mean_sd(values[c]) for c in columns + extra) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--capabilities", nargs="+", default=["default", "avx2"], help="ATEN_CPU_CAPABILITY values; 'native' = unset")
    parser.add_argument("--out", type=Path, default=Path("/tmp/zoo-builds"))
    parser.add_argument("--candidates", type=int, default=400)
    parser.add_argument("--psdfs-candidates", type=int, default=200, help="PS+DFS budget on the demo champion (0: skip)")
    parser.add_argument("--psdfs-seeds", type=int, nargs="*", default=[0], help="zoo seeds that get the PS+DFS run")
    parser.add_argument("--jobs", type=int, default=2, help="builds run side by side (each is single-threaded)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        result = one_build(args.one, args.out, args.candidates, args.psdfs_candidates)
        (args.out / "build.json").write_text(json.dumps(result, indent=2))
        return
    builds = run_all(
        args.seeds, args.capabilities, args.out, args.candidates, args.psdfs_candidates, args.psdfs_seeds, args.jobs
    )
    (args.out / "builds.json").write_text(json.dumps(builds, indent=2))
    print(table(builds))


if __name__ == "__main__":
    main()
