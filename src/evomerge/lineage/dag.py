"""Ancestry of a merged model, across runs, back to the original checkpoints.

A merged model is identified by `model_id` (its parents' content hashes + its recipe, see
`models.identity.merged_model_id`), an original checkpoint by its content hash. Starting from a release packet
(a directory with `lineage.json`) or a run directory (its champion), each merged node reads its full
evidence from the run that made it — trial attributes plus the run's recorded evidence — and each
parent that is itself a packet is followed into *its* run. Shared ancestors (one base under several
merges) appear once: the result is a DAG, rendered as a rich tree, JSON or Graphviz DOT.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.tree import Tree

from evomerge.errors import ConfigError
from evomerge.lineage.packet import EVALUATION_FILE, parent_record
from evomerge.models import LINEAGE_FILE, merged_model_id
from evomerge.search.dfs import PathCandidate
from evomerge.search.store import CONFIG_FILE, find_trial, is_run_dir, load_run, recipe_of

RESOURCE_FIELDS = ("merge_seconds", "eval_seconds", "tokens", "peak_memory_bytes", "device")


@dataclass
class LineageNode:
    """One model in the DAG: a merge (`kind="merged"`) or an original checkpoint (`kind="checkpoint"`)."""

    id: str
    kind: str
    label: str
    details: dict[str, Any]
    parents: list[str] = field(default_factory=list)


@dataclass
class LineageGraph:
    """Nodes by id; `root` is the model whose ancestry was asked for. Edges run parent -> child."""

    root: str
    nodes: dict[str, LineageNode] = field(default_factory=dict)
    # Merges whose ancestry is being read right now: meeting one again means a lineage file names its own
    # descendant (or itself) as a parent, which a real history cannot do.
    visiting: set[str] = field(default_factory=set, repr=False, compare=False)

    def edges(self) -> list[tuple[str, str]]:
        """(parent id, child id) pairs in a stable order."""
        return [(parent, node.id) for node in self.nodes.values() for parent in node.parents]

    def runs(self) -> list[str]:
        """Run directories that contributed a merge to this ancestry, nearest first (breadth-first from root)."""
        order, queue, seen = [], [self.root], {self.root}
        while queue:
            node = self.nodes[queue.pop(0)]
            run = node.details.get("run") or {}
            if node.kind == "merged" and run.get("dir") and run["dir"] not in order:
                order.append(run["dir"])
            fresh = [p for p in node.parents if p not in seen]
            seen.update(fresh)
            queue += fresh
        return order

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: root, nodes (id -> kind, label, details, parents) and edges."""
        return {
            "root": self.root,
            "nodes": {
                node.id: {"kind": node.kind, "label": node.label, "parents": node.parents, "details": node.details}
                for node in self.nodes.values()
            },
            "edges": [list(edge) for edge in self.edges()],
        }


def checkpoint_id(content_hash: str) -> str:
    """Node id of an original checkpoint: its weights' content hash."""
    return "sha256:" + content_hash


def lineage(target: str | Path) -> LineageGraph:
    """The ancestry of a release packet (directory with `lineage.json`) or of a run's champion."""
    target = Path(target)
    graph = LineageGraph(root="")
    if (target / LINEAGE_FILE).is_file():
        graph.root = _add_packet(graph, target)
    elif is_run_dir(target):
        graph.root = _add_candidate(graph, target, "champion")
    else:
        raise ConfigError(f"{target} is neither an exported model (no {LINEAGE_FILE}) nor a run directory (no {CONFIG_FILE})")
    return graph


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path} cannot be read as JSON") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def _add_packet(graph: LineageGraph, packet_dir: Path) -> str:
    """Add an exported model; its run supplies the full evidence when it is still on disk."""
    record = _read_json(packet_dir / LINEAGE_FILE)
    node_id = record.get("model_id")
    if not isinstance(node_id, str) or not node_id:
        raise ConfigError(f"{packet_dir / LINEAGE_FILE} has no model_id")
    run = record.get("run") or {}
    if not isinstance(run, dict) or not isinstance(run.get("dir", ""), str):
        raise ConfigError(f"{packet_dir / LINEAGE_FILE}: field 'run' must be an object naming the run directory")
    if node_id in graph.nodes:
        return node_id
    if node_id in graph.visiting:
        raise ConfigError(f"{packet_dir / LINEAGE_FILE} names itself among its own ancestors (model {node_id})")
    graph.visiting.add(node_id)
    run_dir = Path(run["dir"]) if run.get("dir") else None
    if run_dir is not None and is_run_dir(run_dir) and run.get("trial") is not None:
        _add_candidate(graph, run_dir, str(run["trial"]), packet=packet_dir)
        return node_id
    # The run is gone: what the packet itself carries is all the evidence there is.
    evaluation = _read_json(packet_dir / EVALUATION_FILE) if (packet_dir / EVALUATION_FILE).is_file() else {}
    details = {
        "model_id": node_id,
        "packet": str(packet_dir.resolve()),
        "run": {**run, "available": False},
        "method": record.get("method"),
        "recipe": record.get("recipe"),
        "intended_use": record.get("intended_use", ""),
        "evomerge_version": record.get("evomerge_version"),
        "scores": {"search": evaluation.get("search"), "test": evaluation.get("test")},
    }
    parents = [_add_parent(graph, p) for p in _parent_list(record, packet_dir / LINEAGE_FILE)]
    graph.nodes[node_id] = LineageNode(node_id, "merged", _merged_label(details), details, parents)
    return node_id


def _parent_list(record: Mapping[str, Any], source: Path) -> list[Mapping[str, Any]]:
    parents = record.get("parents", [])
    if not isinstance(parents, list):
        raise ConfigError(f"{source}: field 'parents' must be a list")
    for index, parent in enumerate(parents):
        if not isinstance(parent, dict) or not isinstance(parent.get("content_hash"), str):
            raise ConfigError(f"{source}: parents[{index}] has no content_hash")
        if not isinstance(parent.get("path") or parent.get("ref"), str):
            raise ConfigError(f"{source}: parents[{index}] has neither a path nor a ref")
        if not isinstance(parent.get("model_id", ""), str):
            raise ConfigError(f"{source}: parents[{index}].model_id must be a string")
    return parents


def _add_parent(graph: LineageGraph, parent: Mapping[str, Any]) -> str:
    """A parent: followed into its own packet when it is a merge, else an original checkpoint leaf."""
    path = Path(parent.get("path") or parent["ref"])
    if (path / LINEAGE_FILE).is_file():
        return _add_packet(graph, path)
    if parent.get("model_id"):
        # A merged parent whose packet is no longer at this path: keep the id, say what is missing.
        node_id = parent["model_id"]
        details = {"model_id": node_id, "ref": parent["ref"], "content_hash": parent["content_hash"],
                   "missing": f"packet not found at {path}"}
        graph.nodes.setdefault(node_id, LineageNode(node_id, "merged", node_id, details))
        return node_id
    node_id = checkpoint_id(parent["content_hash"])
    if node_id not in graph.nodes:
        details = {key: parent.get(key) for key in (
            "ref", "path", "revision", "content_hash", "tokenizer_fingerprint", "architecture", "model_type",
            "num_layers", "adapter",
        ) if parent.get(key) is not None}
        graph.nodes[node_id] = LineageNode(node_id, "checkpoint", f"{path.name} ({parent['content_hash'][:12]})", details)
    return node_id


def _add_candidate(graph: LineageGraph, run_dir: Path, candidate: str, packet: Path | None = None) -> str:
    """Add one candidate of a run (a trial number or `champion`) with everything the run recorded."""
    details, parents = candidate_record(run_dir, candidate)
    node_id = details["model_id"]
    if node_id in graph.nodes:
        return node_id
    if packet is not None:
        details["packet"] = str(packet.resolve())
    parent_ids = [_add_parent(graph, p) for p in parents]
    graph.nodes[node_id] = LineageNode(node_id, "merged", _merged_label(details), details, parent_ids)
    return node_id


def candidate_record(run_dir: str | Path, candidate: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evidence of one candidate of a run (details, parent records): the decoded recipe and every
    coefficient, scores with standard errors, resource profile, status, generation, evaluation suite,
    compatibility verdict and intended use. Parent records come from the run's stored evidence (or, for
    runs recorded before it existed, are recomputed from the parents on disk)."""
    run_dir = Path(run_dir)
    config, store = load_run(run_dir)
    trial = find_trial(store, candidate)
    if trial.path is not None:
        # A layer-path candidate: its parents are the path's sources, its "recipe" the path itself (the text
        # its exported packet records, so both give the same model id).
        spec = PathCandidate.from_json(trial.path).spec
        if spec is None:
            raise ConfigError(f"candidate {trial.number} of {run_dir} is not a valid layer path, so it has no lineage")
        refs, method, recipe_yaml = list(spec.source_names), "dfs", json.dumps(spec.to_dict(), indent=2)
        names = [Path(ref).name for ref in refs]
        steps = zip(spec.steps, spec.scales, strict=True)
        settings = {"path": [f"{names[source]} layer {layer} x {scale:.4g}" for (source, layer), scale in steps]}
    else:
        recipe = recipe_of(trial)
        refs, method, recipe_yaml = recipe.parent_refs(), recipe.method, recipe.to_yaml()
        settings = coefficients(recipe_yaml)
    evidence = store.evidence
    by_ref = {p["ref"]: p for p in evidence["parents"]} if evidence is not None else {}
    # Runs recorded before the evidence existed, and a PS+DFS run's model A, are read from disk.
    parents = [by_ref[ref] if ref in by_ref else parent_record(ref, allow_pickle=config.allow_pickle) for ref in refs]
    own = store.test_results.get(f"candidate:{trial.number}", {})
    details = {
        "model_id": merged_model_id(parents, recipe_yaml),
        "run": {"dir": str(run_dir.resolve()), "study": config.name, "trial": trial.number,
                "generation": trial.generation},
        "roles": own.get("roles", []),
        "status": trial.status,
        "failure": trial.failure,
        "method": method,
        "recipe": recipe_yaml,
        "coefficients": settings,
        "parents": [{"content_hash": p["content_hash"], "path": p.get("path", p["ref"]), "ref": p["ref"]}
                    for p in parents],
        "architecture": sorted({p["architecture"] for p in parents if p.get("architecture")}),
        "tokenizer_fingerprints": sorted({p["tokenizer_fingerprint"] for p in parents if p.get("tokenizer_fingerprint")}),
        "compatibility": (evidence or {}).get("compatibility", {"verdict": "not recorded (run predates run evidence)"}),
        "suite": (evidence or {}).get("suite", []),
        "split": trial.split,
        "examples": trial.examples,
        "scores": {"search": trial.scores, "test": own.get("test")},
        "fitness": trial.fitness,
        "resources": {key: getattr(trial, key) for key in RESOURCE_FIELDS},
        "intended_use": config.intended_use,
        "software": (evidence or {}).get("software", {}),
    }
    return details, parents


def coefficients(recipe_yaml: str) -> dict[str, Any]:
    """Every coefficient of a recipe: global parameters and each model's parameters, as written."""
    data = yaml.safe_load(recipe_yaml)
    return {
        "global": data.get("parameters", {}),
        "models": {entry["model"]: entry.get("parameters", {}) for entry in data.get("models", [])},
    }


def _merged_label(details: Mapping[str, Any]) -> str:
    run = details.get("run") or {}
    where = f"{run.get('study', '?')} trial {run.get('trial', '?')}"
    return f"{details['model_id']} ({details.get('method')}, {where})"


# --- rendering ----------------------------------------------------------------------------------
def _score_text(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    stderr = entry.get("stderr")
    return f"{entry['score']:.4f} ± {stderr:.4f} (n={entry['n']})" if stderr is not None else f"{entry['score']:.4f} (n={entry['n']})"


def _value_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(
            f"{rule['filter'] or '*'}={rule['value']:.4g}" if isinstance(rule, dict) else f"{rule:.4g}" for rule in value
        )
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _merged_tree(tree: Tree, details: Mapping[str, Any]) -> None:
    run = details.get("run") or {}
    tree.add(f"run {run.get('dir')}  study {run.get('study')}  trial {run.get('trial')}  generation {run.get('generation')}"
             + ("" if run.get("available", True) else "  [red](run directory not available)[/]"))
    if details.get("missing"):
        tree.add(f"[red]{details['missing']}[/]")
        return
    if details.get("packet"):
        tree.add(f"packet {details['packet']}")
    if "status" in details:
        failure = f" — {details['failure']}" if details.get("failure") else ""
        roles = f"  roles: {', '.join(details['roles'])}" if details.get("roles") else ""
        tree.add(f"status {details['status']}{failure}{roles}")
    if details.get("architecture"):
        tree.add(f"architecture {', '.join(details['architecture'])}; tokenizer "
                 f"{', '.join(fp[:16] for fp in details['tokenizer_fingerprints'])}")
        tree.add(f"compatibility: {details['compatibility'].get('verdict')}")
    recipe = tree.add(f"operator [bold]{details.get('method')}[/]")
    coeffs = details.get("coefficients") or {}
    for name, value in (coeffs.get("global") or {}).items():
        recipe.add(f"global {name}: {_value_text(value)}")
    for model, params in (coeffs.get("models") or {}).items():
        branch = recipe.add(f"{model}")
        for name, value in params.items():
            branch.add(f"{name}: {_value_text(value)}")
    for number, step in enumerate(coeffs.get("path") or []):
        recipe.add(f"step {number}: {step}")
    if details.get("suite"):
        suite = tree.add("evaluation suite")
        for task in details["suite"]:
            suite.add(f"{task['name']}: {task['path']}  sha256 {task['fingerprint'][:16]}  "
                      f"search n={task['n']['search']}  test n={task['n']['test']}  weight {task['weight']} ({task['direction']})")
    scores = details.get("scores") or {}
    score_tree = tree.add(f"scores (fitness {details.get('fitness')}, split {details.get('split', 'search')})")
    for split in ("search", "test"):
        for task, entry in (scores.get(split) or {}).items():
            score_tree.add(f"{split} {task}: {_score_text(entry)}")
    if details.get("resources"):
        r = details["resources"]
        memory = f"{r['peak_memory_bytes'] / 2**20:.0f} MiB" if r.get("peak_memory_bytes") else "-"
        merge_s = f"{r['merge_seconds']:.3f}" if r.get("merge_seconds") is not None else "-"
        eval_s = f"{r['eval_seconds']:.3f}" if r.get("eval_seconds") is not None else "-"
        tree.add(f"resources: merge {merge_s} s, eval {eval_s} s, {r.get('tokens')} tokens, peak memory {memory}, "
                 f"device {r.get('device')}")
    tree.add(f"intended use: {details.get('intended_use') or '(not stated)'}")


def _checkpoint_tree(tree: Tree, details: Mapping[str, Any]) -> None:
    tree.add(f"path {details.get('path', details.get('ref'))}" + (f" @ {details['revision']}" if details.get("revision") else ""))
    tree.add(f"content sha256 {details['content_hash']}")
    tree.add(f"{details.get('architecture')} ({details.get('model_type')}); tokenizer {details.get('tokenizer_fingerprint')}")


def render_tree(graph: LineageGraph) -> Tree:
    """A rich tree from the root back to the original checkpoints; shared ancestors expand once."""
    shown: set[str] = set()

    def add(parent: Tree | None, node_id: str) -> Tree:
        node = graph.nodes[node_id]
        style = "bold green" if node.kind == "merged" else "cyan"
        label = f"[{style}]{node.label}[/]"
        branch = Tree(label) if parent is None else parent.add(label)
        if node_id in shown:
            branch.label = f"{label} [dim](shown above)[/]"
            return branch
        shown.add(node_id)
        (_merged_tree if node.kind == "merged" else _checkpoint_tree)(branch, node.details)
        if node.parents:
            parents = branch.add("parents")
            for parent_id in node.parents:
                add(parents, parent_id)
        return branch

    return add(None, graph.root)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: LineageGraph) -> str:
    """Graphviz DOT: merges as boxes (operator, run, trial, scores), checkpoints as ellipses; parent -> child."""
    lines = ["digraph lineage {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];']
    for node in graph.nodes.values():
        if node.kind == "merged":
            d = node.details
            run = d.get("run") or {}
            text = [node.id, f"{d.get('method')} — {run.get('study')} trial {run.get('trial')} gen {run.get('generation')}"]
            for split in ("search", "test"):
                for task, entry in ((d.get("scores") or {}).get(split) or {}).items():
                    text.append(f"{split} {task}: {_score_text(entry)}")
            shape = "box, style=filled, fillcolor=\"#e6f4ea\"" + (", penwidth=2" if node.id == graph.root else "")
        else:
            d = node.details
            text = [Path(d.get("path", d.get("ref", ""))).name, f"sha256 {d['content_hash'][:16]}", str(d.get("architecture"))]
            shape = "ellipse"
        lines.append(f"  {_dot_quote(node.id)} [label={_dot_quote(chr(10).join(text))}, shape={shape}];")
    for parent, child in graph.edges():
        lines.append(f"  {_dot_quote(parent)} -> {_dot_quote(child)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
