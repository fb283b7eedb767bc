"""Wall time and peak memory of `evomerge merge` against mergekit 0.1.5 on 271M-parameter Llamas.

Builds (once, cached under `--work`) three Llama-shaped float32 checkpoints — a random base and two
"fine-tunes" (base + small noise, so task vectors look like real ones) — then runs the same mergekit
YAML through `mergekit-yaml` (mergekit 0.1.5 in a throw-away venv) and `evomerge merge` (which accepts
mergekit YAML as-is) for linear, SLERP, TIES and DARE-TIES. Each tool runs as a child process and is
measured from outside: wall time from spawn to exit, peak RSS from `os.wait4`'s rusage of that child
(so start-up imports and the writer are included, exactly as a user experiences them).

Targets: evomerge wall <= 0.5x mergekit, evomerge peak RSS <= mergekit.

Usage:
    python benchmarks/merge_speed.py --work /tmp/evomerge_speed [--mkvenv /tmp/mkvenv] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

# 271M parameters: 2 * 32000 * 1024 (embeddings + head) + 16 * (4 * 1024^2 + 3 * 1024 * 2816) + norms.
SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
}
METHODS = ("linear", "slerp", "ties", "dare_ties")


@dataclass(frozen=True)
class Run:
    """One measured child process."""

    seconds: float
    peak_rss_bytes: int


def build_checkpoints(work: Path) -> tuple[dict[str, Path], int]:
    """The base and two fine-tunes (created once, reused when `work` already holds them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {name: work / name for name in ("base", "ft1", "ft2")}
    # mergekit picks its architecture description from `architectures`, so the config must name it.
    config = LlamaConfig(
        **SHAPE, tie_word_embeddings=False, max_position_embeddings=2048, architectures=["LlamaForCausalLM"]
    )
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
    if all((p / "model.safetensors").exists() for p in paths.values()):
        count = sum(t.numel() for t in load_file(paths["base"] / "model.safetensors").values())
        return paths, count
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Random normal weights (std 0.02) are all the benchmark needs; skipping HF's init keeps the build fast.
    weights = {
        name: (torch.randn(p.shape) * 0.02 if p.ndim > 1 else torch.ones(p.shape))
        for name, p in model.state_dict().items()
    }
    count = sum(t.numel() for t in weights.values())
    for index, name in enumerate(("base", "ft1", "ft2")):
        out = paths[name]
        tensors = (
            weights
            if index == 0
            else {
                key: (value + 0.002 * torch.randn(value.shape)).contiguous() for key, value in weights.items()
            }
        )
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return paths, count


def recipes(p: dict[str, Path]) -> dict[str, dict]:
    """One mergekit YAML per method, the same file for both tools."""
    base, ft1, ft2 = (str(p[k]) for k in ("base", "ft1", "ft2"))

    def tv(method: str, **extra) -> dict:
        return {
            "merge_method": method,
            "base_model": base,
            "dtype": "float32",
            "models": [
                {"model": ft1, "parameters": {"weight": 0.6, **extra}},
                {"model": ft2, "parameters": {"weight": 0.4, **extra}},
            ],
        }

    return {
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": m, "parameters": {"weight": w}} for m, w in ((base, 0.2), (ft1, 0.4), (ft2, 0.4))
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "float32",
            "models": [{"model": base}, {"model": ft1}],
            "parameters": {"t": [0.0, 0.5, 1.0]},
        },
        "ties": tv("ties", density=0.5),
        "dare_ties": tv("dare_ties", density=0.5),
    }


def measure(cmd: list[str], env: dict[str, str]) -> Run:
    """Run `cmd` as a child; its wall time and its own peak RSS (Linux reports ru_maxrss in KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # wait4 gives this child's rusage alone (RUSAGE_CHILDREN would be the max over all children so far).
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    return Run(seconds, usage.ru_maxrss * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/evomerge_speed"))
    parser.add_argument("--mkvenv", type=Path, default=Path("/tmp/mkvenv"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per tool and method; the fastest is kept"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    mergekit = args.mkvenv / "bin" / "mergekit-yaml"
    if not mergekit.exists():
        sys.exit(
            f"{mergekit} is missing: python -m venv {args.mkvenv} && "
            f"{args.mkvenv}/bin/pip install torch==2.13.0 mergekit==0.1.5"
        )
    evomerge = shutil.which("evomerge") or str(Path(sys.executable).parent / "evomerge")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parents, count = build_checkpoints(args.work)
    print(
        f"parents: 3 x {count / 1e6:.1f}M parameters float32 ({count * 4 / 2**30:.2f} GiB each), "
        f"ready in {time.perf_counter() - started:.1f} s; cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    rows = []
    for method, config in recipes(parents).items():
        if method not in args.methods:
            continue
        cfg = args.work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        results: dict[str, Run] = {}
        for tool in ("mergekit", "evomerge"):
            out = args.work / f"out_{tool}_{method}"
            runs = []
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                cmd = (
                    [str(mergekit), str(cfg), str(out)]
                    if tool == "mergekit"
                    else [evomerge, "merge", str(cfg), "--out", str(out)]
                )
                runs.append(measure(cmd, env))
            shutil.rmtree(out, ignore_errors=True)
            results[tool] = min(runs, key=lambda r: r.seconds)
        mk, ev = results["mergekit"], results["evomerge"]
        rows.append(
            {
                "method": method,
                "load": os.getloadavg()[0],
                "mergekit_s": mk.seconds,
                "evomerge_s": ev.seconds,
                "time_ratio": ev.seconds / mk.seconds,
                "mergekit_rss_gib": mk.peak_rss_bytes / 2**30,
                "evomerge_rss_gib": ev.peak_rss_bytes / 2**30,
                "rss_ratio": ev.peak_rss_bytes / mk.peak_rss_bytes,
            }
        )
        print(f"  {method}: mergekit {mk.seconds:.1f} s, evomerge {ev.seconds:.1f} s", flush=True)

    header = f"{'method':<10} {'mergekit s':>10} {'evomerge s':>10} {'ratio':>6} {'mk RSS GiB':>10} {'evo RSS GiB':>11} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<10} {r['mergekit_s']:>10.1f} {r['evomerge_s']:>10.1f} {r['time_ratio']:>6.2f} "
            f"{r['mergekit_rss_gib']:>10.2f} {r['evomerge_rss_gib']:>11.2f} {r['rss_ratio']:>6.2f}"
        )
    print("targets: time ratio <= 0.50, RSS ratio <= 1.00")
    if args.json:
        args.json.write_text(json.dumps({"parameters": count, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
