"""`evomerge demo --vlm` on several VLM zoo seeds: does the champion beat every parent and baseline?

For each seed: build (or reuse, from $EVOMERGE_CACHE) the VLM zoo, run the VLM demo, and tabulate on the
target's test split the parents, the untuned baselines and the champion, with the champion's paired
comparison (exact McNemar) against every parent and every baseline, and the wall time of build and demo.

    python benchmarks/vlm_demo_builds.py --seeds 0 1 2 --out /tmp/vlm-demo-builds

Prints a Markdown table and writes builds.json under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evomerge.pipelines.demo_vlm import VLM_DEMO_CANDIDATES, run_vlm_demo
from evomerge.zoo.vlm import build_vlm_zoo


def one_seed(seed: int, out: Path, candidates: int) -> dict:
    """Build the seed's VLM zoo, run the demo, return its summary with timings."""
    started = time.perf_counter()
    build_vlm_zoo(seed=seed)
    built = time.perf_counter()
    _, summary = run_vlm_demo(out / f"seed{seed}", candidates=candidates, seed=seed)
    return {"seed": seed, "build_seconds": built - started, "demo_seconds": time.perf_counter() - built, **summary}


def table(results: list[dict]) -> str:
    """One row per seed: every model's target test score, the worst paired p-value of the champion."""
    target = results[0]["target_task"]
    names = [name for name in results[0]["test"] if not name.startswith("candidate:")]
    lines = [
        "| seed | " + " | ".join(names) + " | champion | min diff | max p (vs every parent and baseline) | build s | demo s |",
        "|---" * (len(names) + 6) + "|",
    ]
    for result in results:
        scores = [f"{result['test'][name][target]['score']:.3f}" for name in names]
        champion = result["test"][result["champion"]][target]["score"]
        comparisons = result["comparisons"].values()
        lines.append(
            f"| {result['seed']} | " + " | ".join(scores) + f" | {champion:.3f} | "
            f"{min(c['difference'] for c in comparisons):+.3f} | {max(c['p_value'] for c in comparisons):.1e} | "
            f"{result['build_seconds']:.0f} | {result['demo_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--candidates", type=int, default=VLM_DEMO_CANDIDATES)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [one_seed(seed, args.out, args.candidates) for seed in args.seeds]
    (args.out / "builds.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
