"""The package structure docs/ARCHITECTURE.md promises, checked on the source with `ast`.

Nodes are evomerge's sub-packages and top-level modules (`cli`, `errors`, `validation`, the package
itself); an edge is any import, lazy ones inside functions included (a lazy import is still a
dependency, it only hides the cycle from the interpreter).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import evomerge

SRC = Path(evomerge.__file__).parent
MAX_LINES = 450
# The trial/study attribute API of Optuna: only the run store may touch it.
TRIAL_ATTR_NAMES = {"user_attrs", "set_user_attr", "set_trial_user_attr", "set_study_user_attr",
                    "system_attrs", "set_system_attr", "set_trial_system_attr"}
RUN_STORE = "search/store.py"
# Optuna's private handles, for which its storages have public methods.
OPTUNA_PRIVATES = {"_study_id", "_trial_id", "_storage"}


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(SRC.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def node_of(path: Path) -> str:
    """The graph node a source file belongs to: its sub-package, or the top-level module's name."""
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py").replace("__init__", "evomerge")


def imported(tree: ast.Module) -> Iterator[tuple[str, list[str]]]:
    """(dotted evomerge module, names imported from it) for every import in the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("evomerge"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evomerge") and not node.level:
            yield node.module, [alias.name for alias in node.names]


def target_node(module: str, names: list[str]) -> str:
    parts = module.split(".")
    if len(parts) > 1:
        return parts[1]
    # `from evomerge import errors` imports a module; `from evomerge import evolve` the package facade.
    submodules = {n for n in names if (SRC / n).is_dir() or (SRC / f"{n}.py").is_file()}
    if not submodules and names == ["__version__"]:
        # A constant the package defines before anything else (its facade imports lazily): a leaf that
        # every layer may read, so `zoo`/`search` reading it is no cycle through `evomerge.evolve`.
        return "version"
    return next(iter(submodules), "evomerge")


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path, tree in modules():
        source = node_of(path)
        edges = graph.setdefault(source, set())
        for module, names in imported(tree):
            target = target_node(module, names)
            if target != source:
                edges.add(target)
    return graph


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_cycle_finder_finds_cycles():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert sorted(find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}})) == [["a", "b"], ["c", "d"]]


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert {"models", "merge", "search", "lineage", "report", "pipelines", "cli"} <= set(graph)
    assert find_cycles(graph) == []


def test_one_way_layers():
    graph = import_graph()
    assert "lineage" not in graph["search"] and "pipelines" not in graph["search"]
    assert "pipelines" not in graph["lineage"] and "pipelines" not in graph["report"]


def test_no_import_of_another_packages_private_names():
    offenders = []
    for path, tree in modules():
        source = node_of(path)
        for module, names in imported(tree):
            if target_node(module, names) == source:
                continue
            private = [n for n in [*module.split(".")[1:], *names] if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{path.relative_to(SRC)}: {module} {private}")
    assert offenders == []


def test_no_module_over_the_size_limit():
    sizes = {str(path.relative_to(SRC)): len(path.read_text().splitlines()) for path in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def attribute_users(names: set[str], *, own_ok: bool = False) -> set[str]:
    """Modules that access an attribute in `names` (on `self` too, unless `own_ok`: a class's own field)."""
    users = set()
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in names:
                if own_ok and isinstance(node.value, ast.Name) and node.value.id == "self":
                    continue
                users.add(path.relative_to(SRC).as_posix())
    return users


def test_only_the_run_store_touches_trial_attributes():
    assert attribute_users(TRIAL_ATTR_NAMES) == {RUN_STORE}


def test_no_optuna_private_handles():
    assert attribute_users(OPTUNA_PRIVATES, own_ok=True) == set()
