"""lm-eval tasks as evolve objectives: a local lm-eval task built from the zoo's data, the real zoo
models and real lm-eval, offline; a task whose data would need a download stops in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.lineage.packet import export_candidate
from evomerge.pipelines import evolve
from evomerge.search.store import load_run

pytest.importorskip("lm_eval")

DOCS = 10  # per split: lm-eval generates greedily, one document at a time on CPU
TASK = "evomerge_zoo_add"


def write_lm_eval_task(zoo, directory: Path) -> Path:
    """The zoo's `add` task as lm-eval task YAML: its search and test rows as lm-eval splits."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, lm_split in (("search", "validation"), ("test", "test")):
        rows = (zoo.tasks["add"].parent / f"add_{split}.jsonl").read_text().splitlines()[:DOCS]
        files[lm_split] = str(directory / f"{lm_split}.jsonl")
        Path(files[lm_split]).write_text("\n".join(rows) + "\n")
    (directory / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": files},
        "validation_split": "validation", "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{question}}=", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))
    return directory


def config(zoo, tmp_path: Path, objective: dict, racing: bool = False) -> Path:
    path = tmp_path / "evolve.yaml"
    path.write_text(yaml.safe_dump({
        "name": "lmeval", "base_model": str(zoo.base), "parents": [str(zoo.specialists["math"])],
        "method": "task_arithmetic", "genome": {"weight": {"bounds": [0.5, 1.5]}},
        "objectives": [objective], "budget": {"candidates": 3 if racing else 2, "population": 2}, "optimizer": "random",
        "racing": {"enabled": racing, "first_fraction": 0.34}, "license": "apache-2.0", "cpu_threads": 1,
    }))
    return path


def test_evolve_on_a_local_lm_eval_task(zoo, tmp_path):
    from evomerge.evaluate.lmeval import evaluate_lm_eval, open_lm_eval_task

    tasks = write_lm_eval_task(zoo, tmp_path / "lm_tasks")
    objective = {"task": f"lm_eval:{TASK}", "include_path": str(tasks), "search_split": "validation",
                 "test_split": "test"}
    outcome = evolve(config(zoo, tmp_path, objective), tmp_path / "run")
    champion = outcome.test_results[f"candidate:{outcome.selection.champion}"]["test"][TASK]
    assert champion["n"] == DOCS
    evidence = load_run(tmp_path / "run")[1].evidence["suite"][0]
    assert evidence["n"] == {"search": DOCS, "test": DOCS} and evidence["scorer"] == "lm-eval"
    # Independently: the exported champion, read from disk, scored by lm-eval on the test split.
    packet = export_candidate(tmp_path / "run", "champion", tmp_path / "champion")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(packet).eval(), AutoTokenizer.from_pretrained(packet)
    task = open_lm_eval_task(TASK, include_path=tasks, include_defaults=False, split="test")
    direct = evaluate_lm_eval(model, tokenizer, [task])[TASK]
    assert direct.values == champion["values"]


def test_one_split_is_divided_by_a_seeded_shuffle_and_raced(zoo, tmp_path):
    tasks = write_lm_eval_task(zoo, tmp_path / "lm_tasks")
    objective = {"task": f"lm_eval:{TASK}", "include_path": str(tasks), "split": "test", "search_fraction": 0.6}
    outcome = evolve(config(zoo, tmp_path, objective, racing=True), tmp_path / "run")
    store = load_run(tmp_path / "run")[1]
    assert store.evidence["suite"][0]["n"] == {"search": 6, "test": 4}
    assert {t.scores[TASK]["n"] for t in store.fully_evaluated()} == {6}
    # Once two candidates are complete, the third races on growing parts of the split (lm-eval `samples`):
    # ceil(0.34 * 6) = 3, then ceil(0.68 * 6) = 5, then all 6, unless it is raced out before.
    raced = store.study.trials[2].intermediate_values
    assert sorted(raced) == [3, 5, 6][: len(raced)]
    assert outcome.test_results[f"candidate:{outcome.selection.champion}"]["test"][TASK]["n"] == 4


def test_lm_eval_fields_need_an_lm_eval_task(zoo, tmp_path):
    with pytest.raises(ConfigError, match="include_path only apply to an lm-eval task"):
        evolve(config(zoo, tmp_path, {"task": str(zoo.tasks["add"]), "include_path": "x"}), tmp_path / "run")


def test_a_task_needing_a_download_exits_2_in_one_sentence(zoo, tmp_path, evomerge_cli):
    path = config(zoo, tmp_path, {"task": "lm_eval:arc_easy"})
    code, _, err = evomerge_cli.run(["evolve", str(path), "--run", str(tmp_path / "run")], tmp_path)
    assert code == 2, err
    message = " ".join(err.split())
    assert "Traceback" not in err and "ConnectionError" not in err
    assert message.startswith("error: lm-eval task 'arc_easy' needs data that is not on this machine")
    assert not (tmp_path / "run").exists()
    assert json.dumps(message).count(". ") == 0
