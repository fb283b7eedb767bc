"""Release packets: a candidate written as a full checkpoint with its recipe, scores, lineage and card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import optuna

from evomerge import __version__
from evomerge.lineage.card import CardInfo, CardScore, render_model_card
from evomerge.merge.stream import run_merge
from evomerge.models import Checkpoint
from evomerge.search.config import EvolveConfig
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


def packet_files(
    run_dir: str | Path, config: EvolveConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial, *,
    method: str, parents: list[str], base_model: str | None, recipe_text: str, searched: str,
) -> dict[str, str]:
    """The packet's text files for one trial: model card (`README.md`), lineage and evaluation JSON.

    `recipe_text` is what made the model (a recipe, or a DFS layer path as JSON); `searched` ends the
    card's sentence "found by an evolutionary search ... over <searched>".
    """
    records = [parent_record(ref) for ref in parents]
    test_results = study.user_attrs.get("test_results", {})
    own = test_results.get(f"candidate:{trial.number}", {})
    evaluation = {
        "candidate": trial.number,
        "search": trial.user_attrs.get("scores"),
        "test": own.get("test"),
        "comparisons": {name: r.get("test") for name, r in test_results.items() if name != f"candidate:{trial.number}"},
    }
    lineage = {
        "model_id": model_id(records, recipe_text),
        "evomerge_version": __version__,
        "run": {"dir": str(Path(run_dir).resolve()), "study": config.name, "trial": trial.number,
                "generation": trial.user_attrs.get("generation")},
        "method": method,
        "parents": records,
        "recipe": recipe_text,
        "intended_use": config.intended_use,
    }
    scores = [
        CardScore(task=name, metric="accuracy", value=entry["score"], split="test")
        for name, entry in (own.get("test") or {}).items()
    ]
    card = render_model_card(
        CardInfo(
            name=f"{config.name}-candidate-{trial.number}",
            method=method,
            parents=parents,
            base_model=base_model,
            recipe_yaml=recipe_text,
            summary=(
                f"This model was found by an evolutionary search (evomerge run `{config.name}`, candidate "
                f"{trial.number}) over {searched}, scored on the search split of its tasks; the test-split "
                "scores below were measured once, after the search."
            ),
            intended_use=config.intended_use,
            scores=scores,
        )
    )
    return {"README.md": card, LINEAGE_FILE: json.dumps(lineage, indent=2), EVALUATION_FILE: json.dumps(evaluation, indent=2)}


def export_candidate(run_dir: str | Path, candidate: str, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `candidate` (a trial number or `champion`) of a run as a release packet in `out_dir`.

    A layer-path (DFS) run's candidate is written by `evomerge.search.dfs.export_path_candidate`.
    """
    config, study = load_run(run_dir)
    if config.dfs is not None:
        from evomerge.search.dfs import export_path_candidate

        return export_path_candidate(run_dir, candidate, out_dir, overwrite=overwrite)
    trial = find_trial(study, candidate)
    recipe = recipe_of(trial)
    files = packet_files(
        run_dir, config, study, trial, method=recipe.method, parents=recipe.parent_refs(),
        base_model=recipe.base_model, recipe_text=recipe.to_yaml(),
        searched=f"`{recipe.method}` merge recipes of its parents",
    )
    run_merge(recipe, out_dir, overwrite=overwrite, extra_files=files)
    return Path(out_dir)
