"""Build (or reuse) the VLM zoo: a tiny Llava grown from the text zoo's base, and image-grounded tasks.

Layout of a built VLM zoo directory::

    vlm_zoo.json            manifest: the text zoo it was built on (path and build), models, tasks
    models/vlm/             LlavaForConditionalGeneration safetensors + processor (answers pictures in language 1)
    tasks/<task>.yaml       vqa, vqa_l2, target (+ JSONL per split and tasks/images/*.png)

The VLM zoo is a zoo of its own, cached beside the text zoo and keyed on the text zoo's build: its code
lives in this sub-package, outside the files the text zoo's source digest covers, so building it never
changes the text zoo's weights or invalidates its cache. The language parent is the text zoo's
`language` specialist (it writes language 2), used where it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from evomerge import __version__
from evomerge.zoo.builder import (
    BASE_MIXTURE,
    ProgressCallback,
    Zoo,
    _stream_seed,
    build_zoo,
    cached_build,
    default_zoo_dir,
    resolve_preset,
    source_digest,
)
from evomerge.zoo.tasks import draw_splits, held_out_keys, task_specs, training_families
from evomerge.zoo.train import deterministic_torch
from evomerge.zoo.vlm.tasks import VlmSplits, draw_scene_splits, write_vlm_tasks
from evomerge.zoo.vlm.train import VlmTrainConfig, initial_vlm, make_processor, train_vlm

MANIFEST = "vlm_zoo.json"
TARGET = "target"


@dataclass(frozen=True)
class VlmPreset:
    """Everything a VLM zoo build depends on besides the seed and the text zoo."""

    train: VlmTrainConfig
    splits: VlmSplits


VLM_PRESET = VlmPreset(
    train=VlmTrainConfig(steps=600, batch_size=64, lr_vision=3e-3, lr_language=5e-4, text_replay=0.3),
    splits=VlmSplits(vqa=(200, 300), vqa_l2=(100, 300), target_visual=(100, 250), target_text=(100, 250)),
)


@dataclass(frozen=True)
class VlmZoo:
    """A built VLM zoo on disk, with the text zoo it grew from."""

    root: Path
    vlm: Path
    text: Zoo
    tasks: dict[str, Path]
    manifest: dict[str, Any]

    @property
    def language(self) -> Path:
        """The language-2 parent: the text zoo's language specialist."""
        return self.text.specialists["language"]

    @property
    def target_task(self) -> Path:
        """The task needing both parents' skills (docs/ZOO.md says which composition and why)."""
        return self.tasks[TARGET]

    @classmethod
    def load(cls, root: Path) -> VlmZoo:
        """Read a built VLM zoo from its manifest (model and task paths relative to ``root``)."""
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(
            root=root,
            vlm=root / manifest["models"]["vlm"]["path"],
            text=Zoo.load(Path(manifest["text_zoo"])),
            tasks={name: root / path for name, path in manifest["tasks"].items()},
            manifest=manifest,
        )


def default_vlm_zoo_dir(seed: int = 0) -> Path:
    """`$EVOMERGE_CACHE/vlm-zoo-tiny-seed<seed>`, beside the text zoo it is built on."""
    return default_zoo_dir("tiny", seed).with_name(f"vlm-zoo-tiny-seed{seed}")


def build_vlm_zoo(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    text_zoo_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> VlmZoo:
    """Build the VLM zoo deterministically (after building or reusing the tiny text zoo of ``seed``), or
    return the one already there when its manifest records the same build (seed, preset, text zoo build,
    versions, digest of this sub-package's source). Training is single-threaded and seeded."""
    out_dir = Path(out_dir) if out_dir is not None else default_vlm_zoo_dir(seed)
    text = build_zoo(text_zoo_dir if text_zoo_dir is not None else default_zoo_dir("tiny", seed), seed=seed,
                     on_progress=on_progress)
    parameters = {
        "seed": seed,
        "preset": json.loads(json.dumps(dataclasses.asdict(VLM_PRESET))),
        "text_zoo": text.manifest["build"],
        "evomerge_version": __version__,
        "torch_version": torch.__version__,
        "source_sha256": source_digest(Path(__file__).parent),
    }
    cached_build(
        out_dir, parameters, lambda staging: _build_into(staging, text, parameters, seed, on_progress),
        manifest=MANIFEST, force=force, what="VLM zoo directory",
    )
    return VlmZoo.load(out_dir)


def _text_held_out(text: Zoo) -> dict[str, frozenset]:
    """The text zoo's evaluation problems, recomputed as its builder drew them: replay must avoid them."""
    preset = resolve_preset(text.manifest["size"])
    specs = task_specs()
    sizes = {name: {"search": search, "test": test} for name, search, test in preset.split_sizes}
    keys = draw_splits({name: specs[name] for name in sizes}, sizes, text.manifest["seed"])
    return held_out_keys(specs, keys)


def _build_into(root: Path, text: Zoo, parameters: dict[str, Any], seed: int, on_progress: ProgressCallback | None) -> None:
    scenes = draw_scene_splits(VLM_PRESET.splits, seed)
    tasks = write_vlm_tasks(root / "tasks", scenes, text.tasks["translate"], VLM_PRESET.splits)
    held_out = frozenset(scene for split in scenes.values() for scene in split)
    families = training_families(_text_held_out(text))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(text.base)
    processor = make_processor(tokenizer)
    config = VLM_PRESET.train
    with deterministic_torch(seed):
        model = initial_vlm(text.base, tokenizer, _stream_seed(seed, "vlm-init"))
        losses = train_vlm(
            model, processor, families, BASE_MIXTURE, held_out, config, seed=_stream_seed(seed, "vlm"),
            on_step=None if on_progress is None else lambda done: on_progress("vlm", done, config.steps),
        )
    out = root / "models" / "vlm"
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tail = losses[-50:]
    manifest = {
        "format": 1,
        "build": parameters,
        "seed": seed,
        "text_zoo": str(text.root.resolve()),
        "models": {"vlm": {"path": "models/vlm", "final_loss": round(sum(tail) / len(tail), 4),
                           "parameters": sum(p.numel() for p in model.parameters())}},
        "tasks": {name: str(path.relative_to(root)) for name, path in tasks.items()},
        "target": TARGET,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

