"""Export a layer path as an ordinary causal-LM checkpoint, folding the path's scales into the weights.

Derivation. A pre-norm block computes ``L(x) = x + A(n(x)) + M(n(x + A(n(x))))`` where the norm n ignores a
positive factor: ``n(c x) = n(x)`` for c > 0 (RMSNorm, up to its epsilon). The path computes
``u_{k+1} = L_k(w_k u_k)`` from the embeddings ``u_0``. Let ``α_0 = 1``, ``α_{k+1} = α_k / w_k`` and give
the exported step k the weights of ``L_k`` with the attention output projection and the MLP down
projection multiplied by ``c = α_{k+1}`` (weight and bias: the whole branch output scales). If the exported
hidden state is ``h_k = α_k u_k``, then ``n(h_k) = n(w_k u_k)`` and

    h_{k+1} = α_k u_k + c A(n(w_k u_k)) + c M(n(w_k u_k + A(n(w_k u_k))))
            = α_{k+1} (w_k u_k + A(...) + M(...)) = α_{k+1} u_{k+1},

using ``α_k = α_{k+1} w_k`` and ``n(α_k u_k + c A) = n(α_{k+1}(w_k u_k + A))``. The final norm removes
``α_T``, so the logits agree. The only error is the norms' epsilon: RMSNorm divides by
``sqrt(mean(x²) + eps)``, so a hidden state scaled by c sees an effective ``eps / c²``; the relative change of
the norm's output is about ``eps / (2 mean(x²)) · |1/c² - 1|``. Folding is invalid for w <= 0 (a negative
factor flips the norm's output) and for blocks whose norms are not all pre-norms (e.g. Gemma 2's post-norms).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.errors import ConfigError, ExportError, ModelError
from evomerge.flow.model import PathModel, check_path_sources
from evomerge.flow.spec import PathSpec
from evomerge.models import CheckpointWriter

#: Parameters whose output enters the residual stream directly: these carry the folded factor.
FOLDED_PREFIXES = ("self_attn.o_proj.", "mlp.down_proj.")

#: Sidecar recording the exported path and its folding factors (for lineage and model cards).
PATH_RECORD = "evomerge_path.json"


def fold_factors(scales: Sequence[float]) -> list[float]:
    """``[α_1, ..., α_T]`` with ``α_{k+1} = α_k / w_k``, ``α_0 = 1``: step k's branch outputs are scaled by α_{k+1}.

    Raises `ExportError` for a scale <= 0 or a factor that over/underflows float64.
    """
    factors = []
    alpha = 1.0
    for step, scale in enumerate(scales):
        if not scale > 0:
            raise ExportError(
                f"path step {step} has scale {scale}; only positive scales can be folded into the weights "
                f"(RMSNorm removes positive factors only)."
            )
        alpha /= scale
        if alpha == 0.0 or not math.isfinite(alpha):
            raise ExportError(f"folding the path's scales over/underflows at step {step} (factor {alpha}).")
        factors.append(alpha)
    return factors


def folded_tensors(model: PathModel) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported checkpoint's tensors, one at a time: model A's embeddings, final norm and head (unless
    tied), and one layer per path step with its residual-branch output projections folded."""
    yield "model.embed_tokens.weight", model.embed_tokens.weight
    yield "model.norm.weight", model.norm.weight
    if not model.config.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.weight
    for step, factor in enumerate(fold_factors(model.spec.scales)):
        for suffix, tensor in model.step_layer(step).state_dict().items():
            name = f"model.layers.{step}.{suffix}"
            if suffix.startswith(FOLDED_PREFIXES):
                tensor = (tensor.to(torch.float64) * factor).to(tensor.dtype)
                if not torch.isfinite(tensor).all():
                    raise ExportError(
                        f"folding factor {factor:.3g} overflows {tensor.dtype} in tensor '{name}'."
                    )
            yield name, tensor


def _load_path_model(spec: PathSpec, sources: Sequence[Path]) -> PathModel:
    """Check the sources' configs (before loading any weight), then load them and build the path model."""
    try:
        configs = [AutoConfig.from_pretrained(source) for source in sources]
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read a source config for the path export: {error}") from None
    check_path_sources(configs, spec)
    models = [AutoModelForCausalLM.from_pretrained(source, dtype="auto") for source in sources]
    return PathModel(models, spec)


def export_path(path: PathModel | PathSpec, sources: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write `path` as a plain checkpoint of ``len(path)`` layers loadable by `AutoModelForCausalLM`.

    `sources` are the source checkpoint directories, in the spec's order. Given a `PathSpec`, they are
    loaded; given a `PathModel` (whose source A may be an in-memory merge), its live tensors are written and
    only source A's tokenizer and generation files are read. The config is source A's with the path's depth
    and per-layer `layer_types`. The scales are folded as described in the module docstring. Writing goes
    through `evomerge.models.CheckpointWriter` (sharded, atomic; an existing non-empty `out_dir` is
    refused). Also writes `evomerge_path.json`: the spec and the folding factors.
    """
    source_dirs = [Path(source) for source in sources]
    spec = path.spec if isinstance(path, PathModel) else path
    if len(source_dirs) != spec.num_sources:
        raise ConfigError(
            f"the path has {spec.num_sources} sources but {len(source_dirs)} source directories were given."
        )
    factors = fold_factors(spec.scales)  # refuse unfoldable scales before loading or writing anything
    with CheckpointWriter(out_dir) as writer:
        model = path if isinstance(path, PathModel) else _load_path_model(spec, source_dirs)
        for name, tensor in folded_tensors(model):
            writer.add(name, tensor)
        writer.copy_files(source_dirs[0])
        # Overwrites the donor's config.json: the depth and per-layer lists are the path's.
        writer.write_text("config.json", model.config.to_json_string())
        record = {"path": spec.to_dict(), "fold_factors": factors}
        writer.write_text(PATH_RECORD, json.dumps(record, indent=2) + "\n")
    return writer.out_dir
