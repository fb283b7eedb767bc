"""Build (or reuse) the zoo: a strongly pretrained base, specialists fine-tuned from it, and task files.

Layout of a built zoo directory::

    zoo.json                 manifest: models, skills, tasks, seed, size, build parameters, version
    models/base/             LlamaForCausalLM safetensors + char tokenizer
    models/<specialist>/     one per specialist, fine-tuned from base
    tasks/<task>.yaml        evomerge.evaluate task files (+ <task>_search.jsonl / <task>_test.jsonl)

A build writes everything into a sibling temporary directory and renames it into place last, so a
directory holding ``zoo.json`` is always complete; an interrupted build (Ctrl-C, SIGTERM) removes its
temporary directory, and one left by a killed process (SIGKILL) is removed by the next build.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.zoo.tasks import (
    SPLITS,
    TARGET,
    ZOO_CHARACTERS,
    draw_splits,
    held_out_keys,
    task_specs,
    training_families,
    write_task_files,
)
from evomerge.zoo.tokenizer import build_char_tokenizer
from evomerge.zoo.train import TrainConfig, deterministic_torch, train

MANIFEST = "zoo.json"

#: ``on_progress(model name, steps done, steps of that model)`` during a build.
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions of every zoo model (all share them, so they can be merged)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 32


@dataclass(frozen=True)
class ZooPreset:
    """Everything a build depends on besides the seed; recorded in the manifest and compared for reuse."""

    shape: ModelShape
    base: TrainConfig
    specialists: tuple[tuple[str, str, TrainConfig], ...]
    """``(model name, skill task it is good at, fine-tune config)`` per specialist."""
    split_sizes: tuple[tuple[str, int, int], ...]
    """``(task, search size, test size)``."""


#: The broad pretraining mixture: easy versions of every skill in both languages, plus a little of
#: the hard versions, so the base is strong and every specialist is a small step away from it.
BASE_MIXTURE: tuple[tuple[str, float], ...] = (
    ("add_easy_l1", 0.20),
    ("add_easy_l2", 0.20),
    ("add_l1", 0.03),
    ("add_l2", 0.02),
    ("translate_easy", 0.15),
    ("translate", 0.006),
    ("back_translate_easy", 0.10),
    ("reverse_easy", 0.20),
    ("reverse", 0.006),
)


def specialist_mixture(own: tuple[tuple[str, float], ...], replay: float) -> tuple[tuple[str, float], ...]:
    """A fine-tuning mixture: the specialist's own families plus ``replay`` of the base mixture.

    Replaying base data keeps a specialist close to the base, as gentle real fine-tunes are.
    """
    total = sum(weight for _, weight in BASE_MIXTURE)
    return own + tuple((name, replay * weight / total) for name, weight in BASE_MIXTURE)


def _specialists(steps: int, lr: float, batch_size: int) -> tuple[tuple[str, str, TrainConfig], ...]:
    def config(own: tuple[tuple[str, float], ...]) -> TrainConfig:
        return TrainConfig(
            steps=steps, lr=lr, batch_size=batch_size, mixture=specialist_mixture(own, 0.3),
            warmup=20, min_lr_ratio=1.0,
        )

    return (
        ("math", "add", config((("add_l1", 0.7),))),
        ("language", "translate", config((("translate", 0.5), ("add_easy_l2", 0.2)))),
        ("strings", "reverse", config((("reverse", 0.7),))),
    )


def _splits(target_test: int) -> tuple[tuple[str, int, int], ...]:
    return (
        ("add", 200, 300), ("translate", 200, 300), ("reverse", 200, 300), ("l2_add", 200, 300),
        (TARGET, 300, target_test),
    )


PRESETS: dict[str, ZooPreset] = {
    "tiny": ZooPreset(
        shape=ModelShape(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256),
        base=TrainConfig(steps=1000, lr=3e-3, batch_size=64, mixture=BASE_MIXTURE, warmup=100),
        specialists=_specialists(steps=250, lr=5e-4, batch_size=64),
        split_sizes=_splits(600),
    ),
    "small": ZooPreset(
        shape=ModelShape(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=512),
        base=TrainConfig(steps=4000, lr=2e-3, batch_size=128, mixture=BASE_MIXTURE, warmup=200),
        specialists=_specialists(steps=500, lr=2e-4, batch_size=128),
        split_sizes=_splits(1500),
    ),
    "medium": ZooPreset(
        shape=ModelShape(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1024),
        base=TrainConfig(steps=8000, lr=1e-3, batch_size=256, mixture=BASE_MIXTURE, warmup=400),
        specialists=_specialists(steps=800, lr=1e-4, batch_size=256),
        split_sizes=_splits(3000),
    ),
}


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk."""

    root: Path
    base: Path
    specialists: dict[str, Path]
    tasks: dict[str, Path]
    skills: dict[str, str]
    """Specialist name -> the task it is good at."""
    manifest: dict[str, Any]

    @property
    def target_task(self) -> Path:
        """The composed task no parent can solve alone."""
        return self.tasks[TARGET]

    @classmethod
    def load(cls, root: Path) -> Zoo:
        """Read a built zoo from its manifest (paths in the manifest are relative to ``root``)."""
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        return cls(
            root=root,
            base=root / manifest["models"]["base"]["path"],
            specialists={n: root / m["path"] for n, m in manifest["models"].items() if n != "base"},
            tasks={n: root / t["path"] for n, t in manifest["tasks"].items()},
            skills={n: m["skill"] for n, m in manifest["models"].items() if n != "base"},
            manifest=manifest,
        )


def source_digest(package: Path = Path(__file__).parent) -> str:
    """SHA-256 over a package's own source files (default: the zoo's; sub-packages are not included, so
    the VLM and pool extensions do not invalidate the text zoo): a build made by other code is never reused."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def resolve_preset(size: str, preset: ZooPreset | None = None) -> ZooPreset:
    """The preset of ``size``, or ``preset`` itself when given (size ``custom``)."""
    if preset is not None:
        return preset
    if size not in PRESETS:
        raise ConfigError(f"Unknown zoo size {size!r}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[size]


def build_parameters(size: str, seed: int, preset: ZooPreset) -> dict[str, Any]:
    """The JSON-able description of a build; two builds with equal parameters produce equal zoos."""
    return {
        "size": size,
        "seed": seed,
        "preset": json.loads(json.dumps(dataclasses.asdict(preset))),
        "evomerge_version": __version__,
        "torch_version": torch.__version__,
        "source_sha256": source_digest(),
    }


def default_zoo_dir(size: str = "tiny", seed: int = 0) -> Path:
    """Where a zoo is cached between runs: `$EVOMERGE_CACHE/zoo-<size>-seed<seed>` (default cache
    `~/.cache/evomerge`), so the demo and the tests build it once per machine."""
    cache = Path(os.environ.get("EVOMERGE_CACHE") or Path.home() / ".cache" / "evomerge")
    return cache / f"zoo-{size}-seed{seed}"


def build_zoo(
    out_dir: str | os.PathLike[str],
    *,
    size: str = "tiny",
    seed: int = 0,
    force: bool = False,
    preset: ZooPreset | None = None,
    on_progress: ProgressCallback | None = None,
) -> Zoo:
    """Build the zoo into ``out_dir`` deterministically, or return the one already there.

    An existing zoo is reused when its manifest records the same build parameters (size, seed, preset,
    evomerge and torch versions, digest of the zoo's source); ``force`` rebuilds regardless. ``preset``
    replaces the size's preset (tests build reduced zoos with it; the manifest then says ``custom``).
    Training runs single-threaded on CPU, or on CUDA when available, where it is deterministic per
    device type but not bit-identical to a CPU build. ``on_progress`` follows the training steps.
    """
    out_dir = Path(out_dir)
    size = "custom" if preset is not None else size
    chosen = resolve_preset(size, preset)
    parameters = build_parameters(size, seed, chosen)
    cached_build(
        out_dir, parameters, lambda staging: _build_into(staging, chosen, parameters, seed, on_progress),
        manifest=MANIFEST, force=force, what="Zoo directory",
    )
    return Zoo.load(out_dir)


def cached_build(
    out_dir: Path, parameters: dict[str, Any], build_into: Callable[[Path], None], *, manifest: str,
    force: bool = False, what: str,
) -> None:
    """Build into `out_dir` unless it already holds a build whose `manifest` records `parameters`.

    The build runs in a staging directory beside `out_dir`, under an exclusive lock (concurrent tests and
    demos build once), and is moved into place only when complete; SIGINT/SIGTERM or any error removes the
    staging directory, and one left by a killed build is removed by the next. `what` names the directory in
    errors ("Zoo directory").
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{what} {out_dir} is a file; give a directory to build the zoo in.")
    if not force and _is_complete(out_dir / manifest, parameters):
        return
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / manifest).exists():
        raise ConfigError(f"{what} {out_dir} exists, is not empty and holds no {manifest}; refusing to overwrite it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir.parent / f".{out_dir.name}.lock"):
        # Another process may have finished the same build while we waited for the lock.
        if force or not _is_complete(out_dir / manifest, parameters):
            # Holding the lock, no other build of this directory is running: any staging dir is a killed one's.
            for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
            try:
                with _terminate_as_interrupt():
                    build_into(staging)
                    _replace_dir(staging, out_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while building, so `finally` blocks remove the staging dir.

    Without this, SIGTERM ends the process on the spot and leaves minutes of half-built zoo behind.
    Signal handlers can only be set from the main thread; elsewhere the default stays.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock, so concurrent builds of one zoo (tests, demo) run one at a time."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_complete(manifest_path: Path, parameters: dict[str, Any]) -> bool:
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    return manifest.get("build") == parameters


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished build into place; an old zoo is moved aside first and deleted after the swap."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "zoo")
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(
    root: Path, preset: ZooPreset, parameters: dict[str, Any], seed: int, on_progress: ProgressCallback | None
) -> None:
    specs = task_specs()
    sizes = {name: {"search": search, "test": test} for name, search, test in preset.split_sizes}
    keys = draw_splits({name: specs[name] for name in sizes}, sizes, seed)
    task_paths = write_task_files(root / "tasks", {name: specs[name] for name in sizes}, keys)
    families = training_families(held_out_keys(specs, keys))
    tokenizer = build_char_tokenizer(ZOO_CHARACTERS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models: dict[str, dict[str, Any]] = {}
    with deterministic_torch(seed):
        model = _initial_model(preset.shape, tokenizer, seed)
        losses = train(
            model, tokenizer, families, preset.base, seed=_stream_seed(seed, "base"), device=device,
            on_step=_reporter(on_progress, "base", preset.base.steps),
        )
        base_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        models["base"] = _save(model, tokenizer, root / "models" / "base", skill=None, losses=losses)
        for name, skill, config in preset.specialists:
            model.load_state_dict(base_state)
            losses = train(
                model, tokenizer, families, config, seed=_stream_seed(seed, name), device=device,
                on_step=_reporter(on_progress, name, config.steps),
            )
            models[name] = _save(model, tokenizer, root / "models" / name, skill=skill, losses=losses)
    manifest = {
        "format": 1,
        "build": parameters,
        "seed": seed,
        "size": parameters["size"],
        "evomerge_version": __version__,
        "characters": ZOO_CHARACTERS,
        "models": models,
        "tasks": {
            name: {
                "path": str(path.relative_to(root)),
                "description": specs[name].description,
                "answer_charset": specs[name].answer_charset,
                "sizes": {split: len(keys[name][split]) for split in SPLITS},
            }
            for name, path in task_paths.items()
        },
        "target": TARGET,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _reporter(on_progress: ProgressCallback | None, name: str, steps: int) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    return lambda done: on_progress(name, done, steps)


def _stream_seed(seed: int, stream: str) -> int:
    """A stable per-stream seed (Python's ``hash`` of a str is salted per process, so derive it explicitly)."""
    return seed * 1_000_003 + sum((i + 1) * ord(c) for i, c in enumerate(stream))


def _initial_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    *,
    skill: str | None,
    losses: list[float],
) -> dict[str, Any]:
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-min(50, len(losses)) :]
    return {
        "path": str(out_dir.relative_to(out_dir.parent.parent)),
        "skill": skill,
        "final_loss": round(sum(tail) / len(tail), 4),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
