"""The package's imports run one way (DESIGN.md, "Layers") and form no circle.

Read from the source with ``ast`` (nothing is imported): every ``import`` in a module,
at the top or inside a function, is an edge. ``from pkg import submodule`` is an edge to
the submodule alone (the package is already loading).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lowband"

#: What each layer may import besides itself (DESIGN.md's table). Leaf modules of the
#: package root (errors, versions, the address type, the framing helper) may be imported by
#: any layer.
ALLOWED = {
    "kernels": set(),
    "compress": {"kernels"},
    "wan": set(),
    "transport": {"compress", "kernels"},
    "optim": {"compress", "transport", "kernels"},
    "distro": {"compress", "transport", "kernels"},
    "sync": {"compress", "transport", "kernels"},
}
LEAVES = {"lowband.errors", "lowband._version", "lowband._endpoint", "lowband._frames"}



def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if not isinstance(n, ast.If)] if top_level_only else ast.walk(tree)
    out: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            subs = [f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in MODULES]
            out.update(subs)
            if len(subs) < len(n.names):
                out.add(n.module)
    return {m for m in out if m in MODULES}


def _graph(*, top_level_only: bool) -> dict[str, set[str]]:
    return {m: _imports(f, top_level_only=top_level_only) - {m} for m, f in MODULES.items()}


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED | {"bench": set()} else None


def test_layers_import_only_what_their_row_allows() -> None:
    bad = []
    for m, deps in _graph(top_level_only=False).items():
        layer = _layer(m)
        if layer is None or layer == "bench":
            continue
        for d in deps - LEAVES:
            other = _layer(d)
            if other != layer and other not in ALLOWED[layer]:
                bad.append(f"{m} imports {d}")
    assert not bad, "imports against DESIGN.md's layer table:\n" + "\n".join(sorted(bad))


def test_no_import_circles() -> None:
    assert _circles(_graph(top_level_only=True)) == []
    lazy = [sorted(c) for c in _circles(_graph(top_level_only=False))]
    assert not lazy, f"import circles through function-level imports: {lazy}"


def test_the_checker_sees_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_leaves_import_only_other_leaves() -> None:
    """A leaf (errors, versions, the address type, the framing helper) may be imported by every
    layer, so it imports no layer itself."""
    graph = _graph(top_level_only=False)
    bad = {m: sorted(graph[m] - LEAVES) for m in LEAVES}
    assert not any(bad.values()), f"leaves importing layers: {bad}"
