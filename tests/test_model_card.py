"""Model cards that the Hugging Face Hub accepts: Hub ids only in `base_model`, no path of this machine,
a license from the recipe or the parents' cards, the mergekit tag when its YAML ships, and a release
packet's paired comparison with parents and baselines."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from evomerge.errors import ConfigError
from evomerge.lineage.packet import export_candidate
from evomerge.merge import parse_recipe, run_merge

HUB_ID = "evomerge-test/tiny-base"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def with_card(model: Path, directory: Path, license: str | None) -> Path:
    """A copy of `model` whose README.md card declares `license` (no front matter when None)."""
    out = Path(shutil.copytree(model, directory))
    if license is not None:
        (out / "README.md").write_text(f"---\nlicense: {license}\n---\n\n# {directory.name}\n")
    return out


@pytest.fixture
def hub_cache(tiny_family, tmp_path, monkeypatch) -> Path:
    """The family's base as a Hub download: `HUB_ID` in a Hugging Face cache (offline, local files only)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    with_card(tiny_family["base"], repo / "snapshots" / REVISION, "apache-2.0")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def recipe(base: str, models: list[Path], **extra) -> dict:
    return {
        "method": "task_arithmetic", "base_model": base, "name": "card-test",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], **extra,
    }


def test_hub_parent_is_base_model_and_local_parents_leave_no_path(tiny_family, hub_cache, tmp_path):
    ft1 = with_card(tiny_family["ft1"], tmp_path / "local" / "ft1", "apache-2.0")
    ft2 = with_card(tiny_family["ft2"], tmp_path / "local" / "ft2", "apache-2.0")
    out = tmp_path / "merged"
    run_merge(parse_recipe(recipe(HUB_ID, [ft1, ft2])), out)
    text = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [HUB_ID]
    for entry in card.data.base_model:
        validate_repo_id(entry)
    assert card.data.license == "apache-2.0"
    assert {"merge", "evomerge", "mergekit", "task_arithmetic"} <= set(card.data.tags)
    assert "mergekit_config.yml" in text and (out / "mergekit_config.yml").is_file()
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text
    # The recipe is embedded with each local parent named by its directory.
    embedded = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert [m["model"] for m in embedded["models"]] == ["ft1", "ft2"] and embedded["base_model"] == HUB_ID


def test_conflicting_licenses_are_refused_unless_the_recipe_names_one(tiny_family, tmp_path):
    ft1 = with_card(tiny_family["ft1"], tmp_path / "ft1", "apache-2.0")
    ft2 = with_card(tiny_family["ft2"], tmp_path / "ft2", "llama3")
    base = str(tiny_family["base"])
    with pytest.raises(ConfigError, match=r"licenses conflict: ft1 \(apache-2.0\), ft2 \(llama3\)"):
        run_merge(parse_recipe(recipe(base, [ft1, ft2])), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run_merge(parse_recipe(recipe(base, [ft1, ft2], license="other")), tmp_path / "chosen")
    assert ModelCard.load(tmp_path / "chosen" / "README.md").data.license == "other"


def test_unknown_license_leaves_the_merge_card_without_one(tiny_family, tmp_path):
    run_merge(parse_recipe(recipe(str(tiny_family["base"]), [tiny_family["ft1"]])), tmp_path / "merged")
    card = ModelCard.load(tmp_path / "merged" / "README.md")
    assert card.data.license is None and "Not stated" in card.content


def mcnemar_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided McNemar p-value, computed here from the discordant pairs."""
    up, down = sum(x > y for x, y in zip(a, b)), sum(y > x for x, y in zip(a, b))
    m, k = up + down, min(up, down)
    return 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m)


def test_release_packet_card_compares_with_parents_and_baselines(lineage_runs, tmp_path):
    run = lineage_runs["run_a"]
    out = export_candidate(run, "champion", tmp_path / "packet")
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.base_model is None
    assert "mergekit" in card.data.tags and str(lineage_runs["root"]) not in card.content
    evaluation = json.loads((out / "evaluation.json").read_text())
    mine = evaluation["test"]["add"]["values"]
    rows = [line.split(" | ") for line in card.content.splitlines() if line.startswith("| add |")]
    shown = {row[1]: row for row in rows}
    for name, result in evaluation["comparisons"].items():
        if not name.startswith("candidate:") and result and "values" in result.get("add", {}):
            label = name.removeprefix("parent:")
            assert label in shown, label
            p_value = float(shown[label][7].rstrip(" |"))
            assert p_value == pytest.approx(mcnemar_p(mine, result["add"]["values"]), rel=1e-2)


def test_release_packet_without_a_known_license_is_refused(lineage_runs, tmp_path):
    run = Path(shutil.copytree(lineage_runs["run_a"], tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["license"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="license of .* is unknown .* set `license` in the evolve config"):
        export_candidate(run, "champion", tmp_path / "packet")
    assert ModelCard.load(export_candidate(run, "champion", tmp_path / "ok", license="mit") / "README.md").data.license == "mit"


def test_export_without_a_license_exits_2_in_one_sentence(lineage_runs, tmp_path, evomerge_cli):
    run = Path(shutil.copytree(lineage_runs["run_a"], tmp_path / "run"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["license"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, _, err = evomerge_cli.run(["export", str(run), "--out", str(tmp_path / "packet")], tmp_path)
    assert code == 2 and "Traceback" not in err
    assert " ".join(err.split()).startswith("error: the license of ")
    assert not (tmp_path / "packet").exists()
    code, _, err = evomerge_cli.run(["export", str(run), "--out", str(tmp_path / "ok"), "--license", "mit"], tmp_path)
    assert code == 0, err
    assert ModelCard.load(tmp_path / "ok" / "README.md").data.license == "mit"
