"""Release packets: a candidate written as a full checkpoint with its recipe, scores, lineage and card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.lineage.card import CardInfo, CardScore, render_model_card
from evomerge.merge.planner import run_merge
from evomerge.models import Checkpoint
from evomerge.search.run import find_trial, load_run, recipe_of

LINEAGE_FILE = "lineage.json"
EVALUATION_FILE = "evaluation.json"


def parent_record(ref: str) -> dict[str, Any]:
    """Identity of a parent by content, plus its own lineage when it was itself made by evomerge."""
    checkpoint = Checkpoint.open(ref)
    record = {
        "ref": ref,
        "content_hash": checkpoint.content_hash(),
        "tokenizer_fingerprint": checkpoint.tokenizer_fingerprint(),
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.model_type,
    }
    lineage_file = Path(ref) / LINEAGE_FILE
    if lineage_file.is_file():
        record["model_id"] = json.loads(lineage_file.read_text()).get("model_id")
    return record


def model_id(parents: list[dict[str, Any]], recipe_yaml: str) -> str:
    """A merged model's id: what it was made from (parents by content) and how (the recipe)."""
    digest = hashlib.sha256()
    for parent in parents:
        digest.update(parent["content_hash"].encode())
    digest.update(recipe_yaml.encode())
    return "evomerge:" + digest.hexdigest()[:24]


def export_candidate(run_dir: str | Path, candidate: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `candidate` (a trial number or `champion`) of a run as a release packet in `out_dir`."""
    config, study = load_run(run_dir)
    trial = find_trial(study, candidate)
    recipe = recipe_of(trial)
    recipe_yaml = recipe.to_yaml()
    parents = [parent_record(ref) for ref in recipe.parent_refs()]
    test_results = study.user_attrs.get("test_results", {})
    own = test_results.get(f"candidate:{trial.number}", {})
    evaluation = {
        "candidate": trial.number,
        "search": trial.user_attrs.get("scores"),
        "test": own.get("test"),
        "comparisons": {name: r.get("test") for name, r in test_results.items() if name != f"candidate:{trial.number}"},
    }
    lineage = {
        "model_id": model_id(parents, recipe_yaml),
        "evomerge_version": __version__,
        "run": {"dir": str(Path(run_dir).resolve()), "study": config.name, "trial": trial.number,
                "generation": trial.user_attrs.get("generation")},
        "method": recipe.method,
        "parents": parents,
        "recipe": recipe_yaml,
        "intended_use": config.intended_use,
    }
    scores = [
        CardScore(task=name, metric="accuracy", value=entry["score"], split="test")
        for name, entry in (own.get("test") or {}).items()
    ]
    card = render_model_card(
        CardInfo(
            name=f"{config.name}-candidate-{trial.number}",
            method=recipe.method,
            parents=recipe.parent_refs(),
            base_model=recipe.base_model,
            recipe_yaml=recipe_yaml,
            summary=(
                f"This model was found by an evolutionary search (evomerge run `{config.name}`, candidate "
                f"{trial.number}) over `{recipe.method}` merge recipes of its parents, scored on the search "
                "split of its tasks; the test-split scores below were measured once, after the search."
            ),
            intended_use=config.intended_use,
            scores=scores,
        )
    )
    run_merge(
        recipe,
        out_dir,
        overwrite=overwrite,
        extra_files={
            "README.md": card,
            LINEAGE_FILE: json.dumps(lineage, indent=2),
            EVALUATION_FILE: json.dumps(evaluation, indent=2),
        },
    )
    return Path(out_dir)
