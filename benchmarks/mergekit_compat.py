"""Does `evomerge merge` give mergekit 0.1.5's numbers? Every shared method, on three tiny Llamas.

For each method this writes one mergekit YAML, runs `mergekit-yaml` (in a throw-away venv under /tmp
holding mergekit==0.1.5 with torch==2.13.0 pinned, so pip does not pull a CUDA build) and
`evomerge merge` (auto-detects mergekit YAML) on it, and compares every output tensor:

- deterministic methods: max |ours - mergekit| over all tensors (and relative to max |w|);
- random methods (DARE, DELLA): the two tools draw different masks, so we compare the fraction of
  entries left equal to the base ("unchanged", ~ the drop statistics) and the mean |merged - base|.

Usage:  python benchmarks/mergekit_compat.py [--workdir /tmp/evomerge_mkcompat] [--venv /tmp/mergekit015]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import make_llama  # tests/ is not a package, so import it by path

RANDOM_METHODS = {"dare_linear", "dare_ties", "della", "della_linear"}


def ensure_mergekit_venv(venv: Path) -> Path:
    """A venv with mergekit 0.1.5 (created once); returns its `mergekit-yaml`."""
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "mergekit==0.1.5"]
        subprocess.run(pip, check=True)
    return exe


def build_parents(workdir: Path) -> dict[str, Path]:
    """A random tiny Llama as base and two 'fine-tunes' = base + small noise (realistic task vectors)."""
    base = make_llama(workdir / "base", seed=0, hidden_size=64, num_layers=4)
    parents = {"base": base}
    weights = load_file(base / "model.safetensors")
    for i, scale in ((1, 0.02), (2, 0.03)):
        out = workdir / f"ft{i}"
        shutil.copytree(base, out, dirs_exist_ok=True)
        gen = torch.Generator().manual_seed(100 + i)
        tuned = {
            k: (v + scale * v.std() * torch.randn(v.shape, generator=gen)).contiguous()
            for k, v in weights.items()
        }
        save_file(tuned, out / "model.safetensors", metadata={"format": "pt"})
        parents[f"ft{i}"] = out
    return parents


def configs(p: dict[str, Path]) -> dict[str, dict]:
    """One mergekit config per shared method; exercises per-model params, gradients and filters."""
    base, ft1, ft2 = (str(p[k]) for k in ("base", "ft1", "ft2"))
    common = {"base_model": base, "dtype": "float32"}

    def gta(method: str, extra1: dict, extra2: dict, **glob) -> dict:
        return {
            "merge_method": method, **common,
            "models": [{"model": ft1, "parameters": {"weight": [0.3, 0.8], **extra1}},
                       {"model": ft2, "parameters": {"weight": 0.5, **extra2}}],
            **({"parameters": glob} if glob else {}),
        }  # fmt: skip

    return {
        "linear": {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": base, "parameters": {"weight": 0.2}},
                {"model": ft1, "parameters": {"weight": [0.1, 0.5]}},
                {"model": ft2, "parameters": {"weight": 0.4}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            **common,
            "models": [{"model": base}, {"model": ft1}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "task_arithmetic": gta("task_arithmetic", {}, {}, **{"lambda": 1.2}),
        "ties": gta("ties", {"density": 0.5}, {"density": [0.3, 0.9]}),
        "breadcrumbs": gta("breadcrumbs", {"density": 0.8, "gamma": 0.05}, {"density": 0.7, "gamma": 0.02}),
        "breadcrumbs_ties": gta("breadcrumbs_ties", {"density": 0.8}, {"density": 0.7}, normalize=True),
        "dare_linear": gta("dare_linear", {"density": 0.5}, {"density": 0.5}),
        "dare_ties": gta("dare_ties", {"density": 0.5}, {"density": 0.7}),
        "della": gta("della", {"density": 0.6, "epsilon": 0.1}, {"density": 0.5}),
        "della_linear": gta(
            "della_linear", {"density": 0.6, "epsilon": 0.1}, {"density": 0.5, "epsilon": 0.2}
        ),
        "model_stock": {"merge_method": "model_stock", **common, "models": [{"model": ft1}, {"model": ft2}]},
        "passthrough": {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": ft1, "layer_range": [0, 3]}]},
                {"sources": [{"model": ft2, "layer_range": [1, 4]}]},
            ],
        },
    }


def load_all(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(model_dir / name, framework="pt") as f:
            names = f.keys()
            tensors.update({k: f.get_tensor(k) for k in names})
    return tensors


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def compare(method: str, ours: dict, theirs: dict, base: dict) -> dict:
    """Figures for one method (see the module docstring)."""
    if set(ours) != set(theirs):
        missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        return {"verdict": f"tensor names differ: missing {missing[:3]}, extra {extra[:3]}"}
    if method not in RANDOM_METHODS:
        diff = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)
        scale = max(theirs[k].float().abs().max().item() for k in theirs)
        return {
            "max_abs_diff": diff,
            "rel": diff / scale,
            "verdict": "match" if diff <= 1e-5 * scale else "DIFFER",
        }
    merged = [k for k in ours if k in base and not torch.equal(theirs[k], base[k])]
    numel = sum(base[k].numel() for k in merged)

    def stats(out: dict) -> tuple[float, float]:
        unchanged = sum(int((out[k] == base[k]).sum()) for k in merged) / numel
        mean_step = sum(float((out[k].double() - base[k]).abs().sum()) for k in merged) / numel
        return unchanged, mean_step

    (u_ours, m_ours), (u_mk, m_mk) = stats(ours), stats(theirs)
    ok = abs(u_ours - u_mk) < 0.01 and abs(m_ours / m_mk - 1) < 0.02
    return {
        "unchanged": (u_ours, u_mk),
        "mean_abs_step": (m_ours, m_mk),
        "verdict": "match" if ok else "DIFFER",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/evomerge_mkcompat"))
    parser.add_argument("--venv", type=Path, default=Path("/tmp/mergekit015"))
    parser.add_argument("--methods", nargs="*", help="subset of methods (default: all shared)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    mergekit_yaml = ensure_mergekit_venv(args.venv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    parents = build_parents(args.workdir)
    base = load_all(parents["base"])
    evomerge_exe = shutil.which("evomerge") or "evomerge"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

    rows = []
    for method, config in configs(parents).items():
        if args.methods and method not in args.methods:
            continue
        cfg = args.workdir / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        mk_out, ev_out = args.workdir / f"out_mk_{method}", args.workdir / f"out_ev_{method}"
        shutil.rmtree(mk_out, ignore_errors=True)
        try:
            t_mk = run_timed([str(mergekit_yaml), str(cfg), str(mk_out)], env)
            t_ev = run_timed([evomerge_exe, "merge", str(cfg), "-o", str(ev_out), "--overwrite"], env)
            row = compare(method, load_all(ev_out), load_all(mk_out), base)
        except RuntimeError as error:
            t_mk = t_ev = float("nan")
            row = {"verdict": f"ERROR: {str(error).splitlines()[0]}"}
            print(error, file=sys.stderr)
        rows.append((method, row, t_mk, t_ev))

    print(f"{'method':18s} {'figure (evomerge vs mergekit)':58s} {'mk s':>6s} {'evo s':>6s}  verdict")
    for method, row, t_mk, t_ev in rows:
        if "max_abs_diff" in row:
            figure = f"max|diff| {row['max_abs_diff']:.2e} (rel {row['rel']:.1e})"
        elif "unchanged" in row:
            (u1, u2), (m1, m2) = row["unchanged"], row["mean_abs_step"]
            figure = f"unchanged {u1:.4f} vs {u2:.4f}; mean|step| {m1:.3e} vs {m2:.3e}"
        else:
            figure = ""
        print(f"{method:18s} {figure:58s} {t_mk:6.1f} {t_ev:6.1f}  {row['verdict']}")


if __name__ == "__main__":
    main()
