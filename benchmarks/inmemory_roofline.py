"""The search's in-memory merge against the memory-bandwidth roofline, beside a straightforward reference.

What the search does per candidate: base + N resident task vectors -> merged weights, tensor by tensor
(`evomerge.merge.InMemoryMerger`). A merge is memory-bound, so its floor is the time to move the bytes
that must move at the device's measured copy bandwidth:

    bytes_min = (1 + N) * P * s   (read the base and N task vectors)  +  P * s   (write the output)
              = (N + 2) * P * s                  P = parameters, s = bytes per element of --dtype
    copy bandwidth = 2 * B / t(dst.copy_(src))   (B bytes read + B written; min over repeats)
    roofline = bytes_min / copy bandwidth;   fraction of roofline = roofline / measured time

For each method (task_arithmetic, ties, dare_ties; two task vectors, weights 0.6/0.5, density 0.5,
lambda 1, disjoint mean) it times:

- `tensors`: `InMemoryMerger.tensors(recipe)` consumed tensor by tensor (the kernel path incl. its
  non-finite check); this is the number compared with the roofline;
- `merge_into`: `InMemoryMerger.merge_into(model, recipe)` into a live LlamaForCausalLM (what a search
  trial pays: the merged tensor is also copied into the module, 2 P s more bytes than the roofline);
- `reference`: a plain-torch implementation written here (mask, stack, sign election, disjoint mean; no
  in-place tricks) on its own copy of the task vectors, computed in the same working dtype as evomerge
  (float32 for half precision on CPU, the tensor dtype otherwise) and with the same per-tensor seeds
  (`tensor_seed`), so DARE masks are drawn from the same generator stream.

and checks every output tensor of evomerge against the reference (max |diff| and bit-identity).

Parents are Llama-shaped random checkpoints (base ~ N(0, 0.02), fine-tunes = base + N(0, 0.002))
stored in bfloat16 under --work and built once. `--layers K` keeps the first K decoder layers (plus
embeddings, final norm and head) so a model fits a small machine.

Usage (CPU, what fits 24 GiB):   python benchmarks/inmemory_roofline.py --device cpu --shape 1b --dtype bf16
Usage (GPU, issue #2 item 4):    python benchmarks/inmemory_roofline.py --device cuda --shape 7b --dtype bf16
Custom shape: --shape hidden=2048,intermediate=5632,layers=22,vocab=32000,kv=256
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

# As the `evomerge` CLI does (cli.run): huge pages for the gigabytes of fresh tensors a merge allocates.
# Read when torch first allocates, so it is set before torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch
from torch import Tensor

from evomerge.merge import InMemoryMerger, Recipe, parse_recipe
from evomerge.merge.plan import tensor_seed
from evomerge.models import Checkpoint, CheckpointWriter

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("task_arithmetic", "ties", "dare_ties")
WEIGHTS = (0.6, 0.5)
DENSITY = 0.5
LAMBDA = 1.0


@dataclass(frozen=True)
class LlamaShape:
    """The tensor shapes of a Llama decoder: `kv` is the k/v projection width (heads_kv * head_dim)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every parameter, untied embeddings and head."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def num_params(self) -> int:
        return sum(torch.Size(shape).numel() for _, shape in self.tensors())


# Llama-2-7B (6.74B parameters) and a TinyLlama-1.1B-like shape (grouped-query attention, 4 kv heads).
SHAPES = {
    "7b": LlamaShape(hidden=4096, intermediate=11008, layers=32, vocab=32000, kv=4096),
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=22, vocab=32000, kv=256),
}


def parse_shape(text: str, layers: int | None) -> LlamaShape:
    """A named shape or `hidden=..,intermediate=..,layers=..,vocab=..,kv=..`, optionally cut to `layers`."""
    if text in SHAPES:
        shape = SHAPES[text]
    else:
        fields = dict(item.split("=", 1) for item in text.split(","))
        shape = LlamaShape(**{key: int(value) for key, value in fields.items()})
    if layers is not None:
        shape = LlamaShape(shape.hidden, shape.intermediate, min(layers, shape.layers), shape.vocab, shape.kv)
    return shape


# --- parents ---------------------------------------------------------------------------------------------


def _config(shape: LlamaShape) -> dict[str, object]:
    head_dim = 128 if shape.hidden % 128 == 0 else 64
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.hidden // head_dim,
        "num_key_value_heads": shape.kv // head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def build_parents(work: Path, shape: LlamaShape) -> dict[str, Path]:
    """Base and two fine-tunes in bfloat16 (reused when `work` already holds this shape)."""
    tag = "-".join(str(v) for v in asdict(shape).values())
    paths = {name: work / tag / name for name in ("base", "ft1", "ft2")}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    config = json.dumps(_config(shape), indent=2)
    generator = torch.Generator().manual_seed(0)
    with contextlib.ExitStack() as stack:
        writers = {
            name: stack.enter_context(CheckpointWriter(path, overwrite=True)) for name, path in paths.items()
        }
        for name, size in shape.tensors():
            base = torch.randn(size, generator=generator).mul_(0.02) if len(size) > 1 else torch.ones(size)
            writers["base"].add(name, base.to(torch.bfloat16), copy=False)
            for ft in ("ft1", "ft2"):
                noise = torch.randn(size, generator=generator).mul_(0.002)
                writers[ft].add(name, (base + noise).to(torch.bfloat16), copy=False)
        for writer in writers.values():
            writer.write_text("config.json", config)
    return paths


def recipe_for(method: str, paths: dict[str, Path], seed: int) -> Recipe:
    """Two task vectors; TIES-style methods use the disjoint mean (normalize) as the issue specifies."""
    per_model: dict[str, float] = {} if method == "task_arithmetic" else {"density": DENSITY}
    globals_: dict[str, object] = {"lambda": LAMBDA}
    if method != "task_arithmetic":
        globals_["normalize"] = True
    return parse_recipe(
        {
            "method": method,
            "base_model": str(paths["base"]),
            "seed": seed,
            "models": [
                {"model": str(paths[ft]), "parameters": {"weight": w, **per_model}}
                for ft, w in zip(("ft1", "ft2"), WEIGHTS, strict=True)
            ],
            "parameters": globals_,
        }
    )


# --- the straightforward reference --------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """evomerge's working dtype: CPU half-precision kernels are slow or missing, so float32 there."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def reference_merge(method: str, base: Tensor, deltas: list[Tensor], *, seed: int, name: str) -> Tensor:
    """Plain torch, one step per line of the papers: mask, stack, sign election, disjoint mean."""
    dtype = compute_dtype(base.dtype, base.device)
    w = torch.tensor(WEIGHTS, dtype=dtype, device=base.device)
    stacked = torch.stack([d.to(dtype) for d in deltas])  # [N, *shape]
    if method == "task_arithmetic":
        merged = sum(w[i] * stacked[i] for i in range(len(deltas)))
        return (base.to(dtype) + LAMBDA * merged).to(base.dtype)
    flat = stacked.reshape(len(deltas), -1)
    if method == "ties":
        k = max(1, int(DENSITY * flat.shape[1]))
        magnitude = flat.abs()
        threshold = torch.kthvalue(magnitude, flat.shape[1] - k + 1, dim=1, keepdim=True).values
        mask = magnitude >= threshold  # every entry tied with the k-th largest is kept
        sparse = flat * mask
    else:  # DARE: Bernoulli(density) keep mask from the tensor's own seed, survivors scaled by 1/density
        generator = torch.Generator(device=base.device).manual_seed(tensor_seed(seed, name))
        # u < p with u ~ U[0, 1) in the working dtype: torch.bernoulli's own rule on CPU, and the one
        # rule that draws the same numbers on every device (CUDA's bernoulli_ kernel draws differently)
        mask = (
            torch.rand(flat.shape, generator=generator, dtype=flat.dtype, device=flat.device) < DENSITY
        ).to(flat.dtype)
        sparse = flat * mask / DENSITY
    tau = w[:, None] * sparse
    sign = torch.sign(tau.sum(dim=0))
    sign[sign == 0] = 1
    agree = torch.sign(tau) == sign
    total = (tau * agree).sum(dim=0)
    divisor = (w[:, None] * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    merged = total / divisor
    return (base.to(dtype) + LAMBDA * merged.view(base.shape)).to(base.dtype)


# --- timing ----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Minimum wall time over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes/s of a large `dst.copy_(src)`, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / seconds


def load_reference_inputs(
    paths: dict[str, Path], dtype: torch.dtype, device: torch.device
) -> dict[str, tuple[Tensor, list[Tensor]]]:
    """Base and task vectors per tensor, formed here independently of the merger (same dtype rounding)."""
    base = Checkpoint.open(str(paths["base"]))
    fts = [Checkpoint.open(str(paths[ft])) for ft in ("ft1", "ft2")]
    out = {}
    for name in base.tensor_names():
        b = base.get(name, device=device, dtype=dtype)
        out[name] = (b, [ft.get(name, device=device, dtype=dtype) - b for ft in fts])
    return out


def live_model(paths: dict[str, Path], dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """An uninitialised LlamaForCausalLM of the parents' shape on `device` (the search's live module)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(paths["base"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to_empty(device=device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument(
        "--shape", default="1b", help="7b | 1b | hidden=..,intermediate=..,layers=..,vocab=..,kv=.."
    )
    parser.add_argument("--layers", type=int, default=None, help="keep only the first K decoder layers")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge_roofline"))
    parser.add_argument("--no-reference", action="store_true", help="skip the reference (saves its memory)")
    parser.add_argument("--no-merge-into", action="store_true", help="skip the live-module timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = parse_shape(args.shape, args.layers)
    params = shape.num_params()
    size = torch.empty((), dtype=dtype).element_size()
    n = len(WEIGHTS)
    print(
        f"shape {asdict(shape)}: {params / 1e9:.3f}B parameters, {args.dtype}, device {device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}"
    )

    paths = build_parents(args.work, shape)
    bandwidth = copy_bandwidth(device, min(params * size, 1 << 30), args.repeats)
    bytes_min = (n + 2) * params * size
    roofline = bytes_min / bandwidth
    print(
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; bytes that must move (N+2)*P*s = {bytes_min / 1e9:.2f} GB;"
        f" roofline {roofline * 1e3:.1f} ms"
    )

    reference_inputs = None if args.no_reference else load_reference_inputs(paths, dtype, device)
    model = None if args.no_merge_into else live_model(paths, dtype, device)
    rows = []
    for method in args.methods.split(","):
        row = measure(method, paths, args.seed, device, dtype, args.repeats, reference_inputs, model)
        row["fraction"] = roofline / row["tensors_s"]
        rows.append(row)
        print(format_row(row, roofline), flush=True)
        gc.collect()
    print(
        json.dumps(
            {
                "shape": asdict(shape),
                "params": params,
                "dtype": args.dtype,
                "device": str(device),
                "copy_bandwidth_GBps": bandwidth / 1e9,
                "roofline_ms": roofline * 1e3,
                "rows": rows,
            }
        )
    )


def measure(
    method: str,
    paths: dict[str, Path],
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    reference_inputs: dict[str, tuple[Tensor, list[Tensor]]] | None,
    model: torch.nn.Module | None,
) -> dict[str, object]:
    """Timings (and the reference comparison) of one method; the merger's parents are freed on return."""
    recipe = recipe_for(method, paths, seed)
    merger = InMemoryMerger(recipe, device=device, dtype=dtype)

    def consume() -> None:
        for _ in merger.tensors(recipe):
            pass

    row: dict[str, object] = {"method": method, "tensors_s": best_seconds(consume, device, repeats)}
    if model is not None:
        row["merge_into_s"] = best_seconds(lambda: merger.merge_into(model, recipe), device, repeats)
    if reference_inputs is not None:
        row.update(compare(method, merger, recipe, reference_inputs, seed))

        def reference() -> None:
            for name, (base, deltas) in reference_inputs.items():
                reference_merge(method, base, deltas, seed=seed, name=name)

        row["reference_s"] = best_seconds(reference, device, repeats)
    return row


def compare(
    method: str,
    merger: InMemoryMerger,
    recipe: Recipe,
    inputs: dict[str, tuple[Tensor, list[Tensor]]],
    seed: int,
) -> dict[str, object]:
    """Max |evomerge - reference| over all tensors and whether every tensor is bit-identical."""
    max_diff, identical, differing = 0.0, True, 0

    def pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for name, ours in merger.tensors(recipe):
            base, deltas = inputs[name]
            yield ours, reference_merge(method, base, deltas, seed=seed, name=name)

    for ours, theirs in pairs():
        if not torch.equal(ours, theirs):
            identical = False
            differing += int((ours != theirs).sum())
            max_diff = max(max_diff, float((ours.float() - theirs.float()).abs().max()))
    return {"identical": identical, "max_abs_diff": max_diff, "differing_entries": differing}


def format_row(row: dict[str, object], roofline: float) -> str:
    parts = [
        f"{row['method']:>16}: tensors {row['tensors_s'] * 1e3:9.1f} ms ({row['fraction']:.1%} of roofline)"
    ]
    if "merge_into_s" in row:
        parts.append(f"merge_into {row['merge_into_s'] * 1e3:9.1f} ms ({roofline / row['merge_into_s']:.1%})")
    if "reference_s" in row:
        parts.append(
            f"reference {row['reference_s'] * 1e3:9.1f} ms ({roofline / row['reference_s']:.1%}),"
            f" evomerge {row['reference_s'] / row['tensors_s']:.2f}x faster;"
            f" identical {row['identical']} (max |diff| {row['max_abs_diff']:.3g},"
            f" {row['differing_entries']} entries)"
        )
    return "; ".join(parts)


if __name__ == "__main__":
    main()
