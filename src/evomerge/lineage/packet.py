"""Release packets: a candidate written as a full checkpoint with its recipe, scores, lineage and card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.flow import export_path
from evomerge.lineage.card import comparison_table
from evomerge.merge import run_merge
from evomerge.merge.card import CardInfo, CardScore, render_model_card, resolve_license
from evomerge.models import LINEAGE_FILE, Checkpoint, merged_model_id, parent_identity
from evomerge.search.config import EvolveConfig
from evomerge.search.dfs import PathCandidate
from evomerge.search.store import DUPLICATE, FAILED, RunStore, TrialRecord, find_trial, load_run, recipe_of

EVALUATION_FILE = "evaluation.json"


def parent_record(ref: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Identity of a parent by content (`models.identity.parent_identity`)."""
    return parent_identity(ref, Checkpoint.open(ref, allow_pickle=allow_pickle))


DFS_NO_MERGEKIT = (
    "No `mergekit_config.yml` ships with this model: it is a layer path through its parents with a learned "
    "scale on every step, folded into the weights. mergekit's `passthrough` can stack the same layers but has "
    "no per-step scaling, so its output would be a different model; `recipe` in `lineage.json` and "
    "`evomerge_path.json` describe the path exactly."
)


def packet_files(
    run_dir: str | Path, config: EvolveConfig, store: RunStore, trial: TrialRecord, *,
    method: str, parents: list[str], base_model: str | None, recipe_text: str, searched: str,
    license: str | None = None, mergekit_config: bool = False,
) -> dict[str, str]:
    """The packet's text files for one trial: model card (`README.md`), lineage and evaluation JSON.

    `recipe_text` is what made the model (a recipe, or a DFS layer path as JSON); `searched` ends the
    card's sentence "found by an evolutionary search ... over <searched>". The license is `license`, else
    the config's, else the one the parents' cards agree on; none of these is a `ConfigError` (a release
    packet is meant for the Hub, which asks for one).
    """
    # The run's own permission: a config that allowed pickled parents exports and identifies them too.
    records = [parent_record(ref, allow_pickle=config.allow_pickle) for ref in parents]
    card_license = resolve_license(
        {ref: Checkpoint.open(ref, allow_pickle=config.allow_pickle).path for ref in parents}, license or config.license, required=True,
        field_name="`license` in the evolve config (or pass --license to export)",
    )
    test_results = store.test_results
    key = f"candidate:{trial.number}"
    own = test_results.get(key, {})
    evaluation = {
        "candidate": trial.number,
        "search": trial.scores,
        "test": own.get("test"),
        "comparisons": {name: r.get("test") for name, r in test_results.items() if name != key},
    }
    lineage = {
        "model_id": merged_model_id(records, recipe_text),
        "evomerge_version": __version__,
        "run": {"dir": str(Path(run_dir).resolve()), "study": config.name, "trial": trial.number,
                "generation": trial.generation},
        "method": method,
        "parents": records,
        "recipe": recipe_text,
        "intended_use": config.intended_use,
    }
    scores = [
        CardScore(task=name, metric="accuracy", value=entry["score"], split="test")
        for name, entry in (own.get("test") or {}).items()
    ]
    sections = {}
    if own.get("test"):
        sections["Comparison on the test split"] = (
            "Parents and untuned baseline merges, scored on the same test examples. The difference is paired "
            "per example (exact McNemar test for right/wrong scores, else a paired bootstrap).\n\n"
            + comparison_table(test_results, key, f"candidate {trial.number}")
        )
    if method == "dfs":
        sections["Why there is no mergekit configuration"] = DFS_NO_MERGEKIT
    card = render_model_card(
        CardInfo(
            name=f"{config.name}-candidate-{trial.number}",
            method=method,
            parents=parents,
            base_model=base_model,
            recipe_yaml=recipe_text,
            license=card_license,
            mergekit_config=mergekit_config,
            summary=(
                f"This model was found by an evolutionary search (evomerge run `{config.name}`, candidate "
                f"{trial.number}) over {searched}, scored on the search split of its tasks; the test-split "
                "scores below were measured once, after the search."
            ),
            intended_use=config.intended_use,
            scores=scores,
            extra_sections=sections,
        )
    )
    files = {"README.md": card, LINEAGE_FILE: json.dumps(lineage, indent=2), EVALUATION_FILE: json.dumps(evaluation, indent=2)}
    if method == "dfs":
        files["MERGEKIT.md"] = DFS_NO_MERGEKIT + "\n"
    return files


def export_candidate(
    run_dir: str | Path, candidate: str, out_dir: str | Path, *, overwrite: bool = False, license: str | None = None
) -> Path:
    """Write `candidate` (a trial number or `champion`) of a run as a release packet in `out_dir`.

    `license` overrides the config's `license` and the parents' cards (see `packet_files`).
    """
    config, store = load_run(run_dir)
    trial = find_trial(store, candidate)
    if trial.status == FAILED or (trial.status == DUPLICATE and trial.failure):
        raise ConfigError(
            f"candidate {trial.number} of {run_dir} failed ({trial.failure}); a failed candidate is not exported"
        )
    if config.dfs is not None:
        return _export_path_candidate(run_dir, config, store, trial, Path(out_dir), overwrite=overwrite, license=license)
    recipe = recipe_of(trial)
    files = packet_files(
        run_dir, config, store, trial, method=recipe.method, parents=recipe.parent_refs(),
        base_model=recipe.base_model, recipe_text=recipe.to_yaml(),
        searched=f"`{recipe.method}` merge recipes of its parents", license=license,
        mergekit_config=recipe.to_mergekit_yaml() is not None,
    )
    run_merge(recipe, out_dir, overwrite=overwrite, allow_pickle=config.allow_pickle, extra_files=files)
    return Path(out_dir)


def _export_path_candidate(
    run_dir: str | Path, config: EvolveConfig, store: RunStore, trial: TrialRecord, out_dir: Path, *, overwrite: bool,
    license: str | None,
) -> Path:
    """A layer-path (DFS) candidate's packet: the folded checkpoint plus lineage, evaluation and card.

    Raises `ExportError` when the path cannot be folded (a scale <= 0). The packet is assembled beside
    `out_dir` and moved into place only when complete.
    """
    assert trial.path is not None
    path = PathCandidate.from_json(trial.path)
    if path.spec is None:
        raise ConfigError(f"candidate {trial.number} is not a valid path ({path.failure}); nothing to export")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it")
    sources = list(path.spec.source_names)
    staging = out_dir.with_name(f".{out_dir.name}.dfs-{os.getpid()}")
    try:
        export_path(path.spec, sources, staging)
        files = packet_files(
            run_dir, config, store, trial, method="dfs", parents=sources, base_model=None,
            recipe_text=json.dumps(path.spec.to_dict(), indent=2),
            searched="layer paths through its parents (data-flow-space merging; scales folded into the weights)",
            license=license,
        )
        for name, text in files.items():
            (staging / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
