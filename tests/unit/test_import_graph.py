"""The package's import graph: every module imports, no cycles (imports inside functions count),
and only the coordinator's layer reaches the Ray actors."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("orchestrator", "actors")
# the modules above the actors: the coordinator, its group choices and the surfaces that run it
MAY_IMPORT_ACTORS = ("orchestrator.coordinator", "orchestrator.groups")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> project modules it imports (anywhere in the file)."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                # a package's own __init__ is not an edge of its submodules
                if r and r != m and not (m.startswith(r + ".") and mods[r].name == "__init__.py"):
                    edges[m].add(r)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_no_import_cycles():
    assert _cycles(_edges(_modules())) == []


def test_cycle_finder_finds_a_cycle():
    """The check itself can fail: a two-module loop and a three-module loop are found."""
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert _cycles(edges) == [["a", "b"], ["c", "d", "e"]]


def test_only_the_coordinator_layer_imports_actors():
    edges = _edges(_modules())
    bad = {m: sorted(t for t in ts if t.startswith("actors")) for m, ts in edges.items()
           if m.startswith("orchestrator") and not m.startswith(MAY_IMPORT_ACTORS)}
    assert {m: ts for m, ts in bad.items() if ts} == {}
