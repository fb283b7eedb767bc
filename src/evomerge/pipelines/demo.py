"""`evomerge demo`: the whole product on the built-in tiny zoo, offline, in about ten minutes on 2 cores.

Builds (or reuses) the default zoo, evolves a merge of its specialists for the target capability,
exports the champion as a release packet, writes the HTML report and `summary.json` with the test-split
scores of every parent, every baseline and the champion.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from evomerge.evaluate.stats import PairedComparison, paired_comparison
from evomerge.lineage import export_candidate
from evomerge.pipelines.evolve import EvolveOutcome, evolve
from evomerge.report import write_report
from evomerge.search.run import CandidateResult
from evomerge.zoo import Zoo, build_zoo, default_zoo_dir

DEMO_CANDIDATES = 400
#: Where CMA-ES starts; both were measured on ten zoo builds (docs/ZOO.md) and this one kept.
DEMO_START = "init"
DEMO_LICENSE = "apache-2.0"


def demo_search(
    target_task: Path, *, candidates: int, seed: int, start: str, weight_granularity: str = "per_layer"
) -> dict[str, Any]:
    """What both demos search with: DARE-TIES with a weight per model per layer (or per layer and block
    kind; the paper's start, 0.5) and a density per model, CMA-ES from `start`, fitness = accuracy on the
    target task's search split."""
    return {
        "method": "dare_ties",
        "genome": {
            "weight": {"bounds": [0.0, 1.5], "granularity": weight_granularity, "init": 0.5},
            "density": {"bounds": [0.1, 1.0], "granularity": "global", "init": 0.9},
        },
        "start": start,
        "objectives": [{"task": str(target_task)}],
        "budget": {"candidates": candidates},
        "optimizer": "cmaes",
        "seed": seed,
        "cpu_threads": 1,
        # The zoos' models carry no card: evomerge made them from random weights and its own synthetic
        # data, so they are evomerge's own Apache-2.0 work. Writing a license into the zoo would change
        # its source digest and rebuild every cached zoo; the demo states it instead.
        "license": DEMO_LICENSE,
    }


def demo_config(
    zoo: Zoo, *, candidates: int = DEMO_CANDIDATES, seed: int = 0, start: str = DEMO_START
) -> dict[str, Any]:
    """The demo's evolve config: `demo_search` over the zoo's three specialists."""
    return {
        "name": "demo",
        "base_model": str(zoo.base),
        "parents": [str(path) for path in zoo.specialists.values()],
        **demo_search(zoo.target_task, candidates=candidates, seed=seed, start=start),
        "intended_use": "Demonstration on synthetic tasks; not for real use.",
    }


def run_demo(
    out_dir: str | Path,
    *,
    candidates: int = DEMO_CANDIDATES,
    seed: int = 0,
    start: str = DEMO_START,
    zoo_dir: str | Path | None = None,
    on_candidate: Callable[[CandidateResult], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> tuple[EvolveOutcome, dict[str, Any]]:
    """Run the demo into `out_dir`; returns the evolve outcome and the summary written to summary.json.

    The zoo is built once per machine into the cache (`default_zoo_dir`) unless `zoo_dir` names another.
    """
    zoo = build_zoo(
        zoo_dir if zoo_dir is not None else default_zoo_dir("tiny", seed),
        seed=seed, on_progress=zoo_progress(on_status, "tiny model zoo"),
    )
    config = demo_config(zoo, candidates=candidates, seed=seed, start=start)
    return evolve_and_summarise(
        Path(out_dir), config, zoo.root, zoo.target_task.stem, on_candidate=on_candidate, on_status=on_status
    )


def zoo_progress(
    on_status: Callable[[str], None] | None, zoo: str
) -> Callable[[str, int, int], None] | None:
    """Announce that `zoo` is built or reused, and turn its training steps into status lines (both demos)."""
    if on_status is None:
        return None
    on_status(f"building (or reusing) the {zoo}")
    return lambda model, done, steps: on_status(f"building the {zoo}: training {model} {done}/{steps}")


def evolve_and_summarise(
    out_dir: Path,
    config: dict[str, Any],
    zoo_root: Path,
    target: str,
    *,
    on_candidate: Callable[[CandidateResult], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> tuple[EvolveOutcome, dict[str, Any]]:
    """A demo's second half, for any zoo: evolve `config`, export the champion, write the report and
    `summary.json` (test scores of every parent, baseline and the champion; paired comparisons on the
    `target` task)."""
    config_path = out_dir / "evolve.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    outcome = evolve(config_path, out_dir / "run", on_candidate=on_candidate, on_status=on_status)
    if on_status is not None:
        on_status("exporting the champion")
    export_candidate(outcome.run_dir, "champion", out_dir / "champion", overwrite=True)
    if on_status is not None:
        on_status("writing the HTML report")
    write_report(outcome.run_dir, out_dir / "report.html")
    champion = f"candidate:{outcome.selection.champion}"
    summary = {
        "zoo": str(zoo_root),
        "target_task": target,
        "champion": champion,
        "candidates": outcome.candidates,
        "examples_saved_by_racing": outcome.examples_saved,
        "test": {
            name: {task: _without_values(row) for task, row in result["test"].items()}
            for name, result in outcome.test_results.items()
        },
        "roles": {name: result.get("roles", [result["kind"]]) for name, result in outcome.test_results.items()},
        "baselines": {name: _settings(r["recipe"]) for name, r in outcome.test_results.items() if r["kind"] == "baseline"},
        "comparison": champion_comparison(outcome.test_results, champion, target),
        "comparisons": {
            name: paired.to_dict() for name, paired in each_comparison(outcome.test_results, champion, target).items()
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return outcome, summary


def champion_comparison(test_results: dict[str, Any], champion: str, task: str) -> dict[str, dict[str, Any]]:
    """The champion against the best parent and the best untuned baseline, paired on the test examples.

    "Best" is chosen by test score, which makes the comparison the hardest one for the champion.
    """
    comparison = {}
    for label, kind in (("best_parent", "parent"), ("best_baseline", "baseline")):
        rivals = {name: r["test"][task] for name, r in test_results.items() if r["kind"] == kind and task in r["test"]}
        if not rivals:
            continue
        rival = max(rivals, key=lambda name: rivals[name]["score"])
        paired = paired_comparison(test_results[champion]["test"][task]["values"], rivals[rival]["values"])
        comparison[label] = {"name": rival, **paired.to_dict()}
    return comparison


def each_comparison(test_results: dict[str, Any], champion: str, task: str) -> dict[str, PairedComparison]:
    """The champion against every parent and every baseline, paired on the `task` test examples."""
    mine = test_results[champion]["test"][task]["values"]
    return {
        name: paired_comparison(mine, result["test"][task]["values"])
        for name, result in test_results.items()
        if result["kind"] in ("parent", "baseline") and task in result["test"]
    }


def _without_values(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key != "values"}


def _settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """An untuned baseline's method and parameters, per parent by directory name."""
    return {
        "method": recipe["method"],
        "models": {Path(entry["model"]).name: entry.get("parameters", {}) for entry in recipe.get("models", [])},
        "parameters": recipe.get("parameters", {}),
    }
