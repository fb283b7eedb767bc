"""Does merging compose the VLM zoo's two skills inside one answer? Parents, untuned merges and a task-arithmetic
grid on `target`, `vqa` and `vqa_l2` (test split) of one VLM zoo build (docs/ZOO.md, "The VLM zoo").

    python benchmarks/vlm_composition.py --seed 0 --out /tmp/vlm-composition

Prints one line per model and writes composition.json under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from evomerge.merge import Recipe
from evomerge.merge.recipe import ModelEntry
from evomerge.pipelines.demo_vlm import vlm_demo_config
from evomerge.search.config import load_evolve_config
from evomerge.search.session import open_session
from evomerge.zoo.vlm import build_vlm_zoo

WEIGHTS = (0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    zoo = build_vlm_zoo(seed=args.seed)
    config = vlm_demo_config(zoo, seed=args.seed)
    config["objectives"] = [{"task": str(zoo.tasks[name])} for name in ("target", "vqa", "vqa_l2")]
    (args.out / "evolve.yaml").write_text(yaml.safe_dump(config))
    # The demo's session: the same live Llava, parents and untuned merges the search compares against.
    session = open_session(*load_evolve_config(args.out / "evolve.yaml"))
    results = {}

    def score(name: str) -> None:
        report = session.evaluate("test")
        results[name] = {task: round(s.score, 3) for task, s in report.scores.items()}
        print(name, results[name], flush=True)

    for ref in session.parents():
        session.activate_parent(ref)
        score(f"parent:{Path(ref).name}")
    for name, recipe in session.baselines().items():
        session.activate_baseline(recipe)
        score(name)
    for vlm_weight in WEIGHTS:
        for language_weight in WEIGHTS:
            recipe = Recipe(
                method="task_arithmetic", base_model=str(zoo.text.base), submodule=session.submodule,
                models=[ModelEntry(model=str(zoo.vlm), parameters={"weight": vlm_weight}),
                        ModelEntry(model=str(zoo.language), parameters={"weight": language_weight})],
            )
            session.activate_baseline(recipe)
            score(f"task_arithmetic_vlm{vlm_weight:g}_language{language_weight:g}")
    (args.out / "composition.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
