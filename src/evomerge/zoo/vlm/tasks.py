"""The VLM zoo's task files: pictures written as PNG files, questions as JSONL, task YAMLs.

- ``vqa``     visual questions answered in language 1 (the VLM's skill);
- ``vqa_l2``  the same questions asked for an answer in language 2: the composition measured (docs/ZOO.md);
- ``target``  an even mix of held-out ``vqa`` questions and the text zoo's held-out ``translate`` problems
              (language 2), text rows without a picture: the capability needing both parents.

Every evaluation picture is a distinct scene, drawn from a pool training never samples from.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image

from evomerge.zoo.tasks import SPLITS
from evomerge.zoo.vlm.scenes import QUESTIONS, Scene, draw_scene, render, visual_problem


@dataclass(frozen=True)
class VlmSplits:
    """``(search, test)`` sizes: visual tasks, and the target's visual and text halves."""

    vqa: tuple[int, int]
    vqa_l2: tuple[int, int]
    target_visual: tuple[int, int]
    target_text: tuple[int, int]


def draw_scene_splits(sizes: VlmSplits, seed: int) -> dict[str, list[Scene]]:
    """Distinct evaluation scenes per ``<task>/<split>`` (visual tasks only), no scene used twice."""
    rng = random.Random(f"vlm-zoo-eval/{seed}")
    used: set[Scene] = set()
    drawn: dict[str, list[Scene]] = {}
    for task, (search, test) in (("vqa", sizes.vqa), ("vqa_l2", sizes.vqa_l2), ("target", sizes.target_visual)):
        for split, size in zip(SPLITS, (search, test), strict=True):
            chosen = drawn.setdefault(f"{task}/{split}", [])
            while len(chosen) < size:
                scene = draw_scene(rng)
                if scene not in used:
                    used.add(scene)
                    chosen.append(scene)
    return drawn


def _visual_rows(root: Path, name: str, scenes: list[Scene], language: int, seed: str) -> list[dict]:
    """One row per scene, a seeded question each, the picture saved under ``images/``."""
    rng = random.Random(seed)
    rows = []
    for index, scene in enumerate(scenes):
        question, answer = visual_problem(scene, QUESTIONS[rng.randrange(len(QUESTIONS))], language)
        image = f"images/{name}_{index:04d}.png"
        Image.fromarray(render(scene)).save(root / image)
        rows.append({"question": question, "answer": answer, "image": image})
    return rows


def write_vlm_tasks(
    out_dir: Path, scenes: Mapping[str, list[Scene]], translate_task: Path, sizes: VlmSplits
) -> dict[str, Path]:
    """Write the three tasks; the target's text half is the first rows of the text zoo's translate splits."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    translate = yaml.safe_load(translate_task.read_text())["data"]
    paths = {}
    for name, language, charset, description in (
        ("vqa", 1, "[0-9]", "count the squares in a picture (all, or of one colour), answered in language 1"),
        ("vqa_l2", 2, "[a-j]", "the vqa questions answered in language 2 (digits a-j), asked with the mark #"),
        ("target", 1, None, "an even mix of vqa questions (language 1) and translate problems (language 2)"),
    ):
        data = {}
        for split_index, split in enumerate(SPLITS):
            rows = _visual_rows(out_dir, f"{name}_{split}", scenes[f"{name}/{split}"], language, f"{name}/{split}")
            if name == "target":
                text = (translate_task.parent / translate[split]).read_text().splitlines()
                count = sizes.target_text[split_index]
                rows += [{**json.loads(line), "image": None} for line in text[:count]]
                random.Random(f"target/{split}").shuffle(rows)
            _write_jsonl(out_dir / f"{name}_{split}.jsonl", rows)
            data[split] = f"{name}_{split}.jsonl"
        document = {
            "name": name, "description": description, "data": data, "prompt": "{question}=",
            "answer_field": "answer", "image_field": "image", "fewshot": 0, "scorer": "exact", "scorer_args": {},
            "answer_charset": charset, "generation": {"max_new_tokens": 8, "stop": ["\n"]},
        }
        paths[name] = out_dir / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(document, sort_keys=False))
    return paths


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
