"""Build (or reuse) three distractors beside a built zoo, for searches that choose parents from a pool.

- ``backwards``: a specialist on an irrelevant skill (numbers from language 2 back into language 1, which
  no zoo task asks), fine-tuned from the zoo's base like the real specialists;
- ``other_base``: a model of the same shape and tokenizer pretrained from another initialisation on the
  base's mixture: compatible tensor by tensor, but not a fine-tune of the base (the pool screen rejects it);
- ``degraded``: the math specialist with Gaussian noise on every weight.

This lives in a sub-package on purpose: the zoo's source digest (`zoo.builder.source_digest`) covers only
``zoo/*.py``, so adding distractors changes neither the main zoo's cache key nor its trained weights.
The distractors are cached in their own directory, keyed on the base zoo's build parameters and this
package's source; a build takes well under a minute of training on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evomerge.zoo.builder import BASE_MIXTURE, Zoo, cached_build, source_digest, specialist_mixture
from evomerge.zoo.tasks import draw_splits, held_out_keys, task_specs, training_families
from evomerge.zoo.train import TrainConfig, deterministic_torch, train

MANIFEST = "pool.json"
#: name -> (kind, what it is); the kinds say why a pool search should not choose it.
DISTRACTORS = {
    "backwards": ("irrelevant", "specialist on an irrelevant skill (language 2 -> 1 numbers)"),
    "other_base": ("other_base", "same shape and tokenizer, pretrained from another initialisation"),
    "degraded": ("degraded", "the math specialist with Gaussian noise on every weight"),
}
IRRELEVANT = TrainConfig(steps=100, lr=5e-4, batch_size=64, warmup=20, min_lr_ratio=1.0,
                         mixture=specialist_mixture((("back_translate_easy", 0.7),), 0.3))
OTHER_BASE = TrainConfig(steps=200, lr=3e-3, batch_size=64, warmup=20, mixture=BASE_MIXTURE)
#: Noise standard deviation as a share of each tensor's own: halves the specialist's `add` score on the tiny zoo
#: (0.73 -> 0.37 on the search split; 0.1 left it at 0.72) while
#: keeping it a near copy (its task vector stays a small share of the base's norm, so the screen keeps it).
NOISE = 0.3


@dataclass(frozen=True)
class PoolZoo:
    """The distractors on disk: name -> model directory, and name -> kind."""

    root: Path
    models: dict[str, Path]
    kinds: dict[str, str]


def default_pool_dir(zoo: Zoo) -> Path:
    """Beside the zoo: `<zoo dir>-pool`."""
    return zoo.root.parent / f"{zoo.root.name}-pool"


def _parameters(zoo: Zoo) -> dict[str, Any]:
    base_zoo = hashlib.sha256(json.dumps(zoo.manifest["build"], sort_keys=True).encode()).hexdigest()
    return {"base_zoo": base_zoo, "source_sha256": source_digest(Path(__file__).parent), "torch_version": torch.__version__}


def _load(root: Path) -> PoolZoo:
    manifest = json.loads((root / MANIFEST).read_text())
    return PoolZoo(root, {n: root / n for n in manifest["models"]}, {n: m["kind"] for n, m in manifest["models"].items()})


def build_pool_zoo(zoo: Zoo, out_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> PoolZoo:
    """The distractors of `zoo`, built deterministically into `out_dir` (default `default_pool_dir`) or reused."""
    out_dir = Path(out_dir) if out_dir is not None else default_pool_dir(zoo)
    parameters = _parameters(zoo)
    cached_build(
        out_dir, parameters, lambda staging: _build_into(staging, zoo, parameters),
        manifest=MANIFEST, force=force, what="Pool zoo directory",
    )
    return _load(out_dir)


def _build_into(root: Path, zoo: Zoo, parameters: dict[str, Any]) -> None:
    seed = zoo.manifest["seed"]
    specs = task_specs()
    sizes = {name: task["sizes"] for name, task in zoo.manifest["tasks"].items()}
    # The zoo's own held-out problems: the distractors never train on an evaluation example either.
    keys = draw_splits({name: specs[name] for name in sizes}, sizes, seed)
    families = training_families(held_out_keys(specs, keys))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(zoo.base)
    device = torch.device("cpu")
    with deterministic_torch(seed):
        model = LlamaForCausalLM.from_pretrained(zoo.base)
        train(model, tokenizer, families, IRRELEVANT, seed=seed * 7919 + 1, device=device)
        _save(model, tokenizer, root / "backwards")
        torch.manual_seed(seed + 1)
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(zoo.base))
        train(model, tokenizer, families, OTHER_BASE, seed=seed * 7919 + 2, device=device)
        _save(model, tokenizer, root / "other_base")
        model = LlamaForCausalLM.from_pretrained(zoo.specialists["math"])
        generator = torch.Generator().manual_seed(seed * 7919 + 3)
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * NOISE * tensor.std(unbiased=False))
        _save(model, tokenizer, root / "degraded")
    models = {name: {"kind": kind, "description": text} for name, (kind, text) in DISTRACTORS.items()}
    (root / MANIFEST).write_text(json.dumps({"build": parameters, "models": models}, indent=2) + "\n")


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
