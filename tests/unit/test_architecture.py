"""The package's shape: no import cycles (function-level imports included) and no module
importing another module's private names."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "stagewise"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (SRC / PACKAGE).rglob("*.py"):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> package modules it imports (anywhere in its body), and private imports."""
    edges, private = {m: set() for m in mods}, []
    for m, f in mods.items():
        base = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                    mod = ".".join(parts + ([mod] if mod else []))
                targets = [(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod, a.name) for a in node.names]
            for target, name in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != m:
                    edges[m].add(target)
                    if name and name.startswith("_") and not name.startswith("__"):
                        private.append(f"{m} imports {name} from {target}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_no_private_imports_across_modules():
    edges, private = _imports(_modules())
    assert _cycles(edges) == []
    assert private == []


def test_the_walker_sees_function_level_cycles(tmp_path):
    # The check itself must be able to fail: two modules importing each other inside functions.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import _g\n")
    (pkg / "b.py").write_text("def _g():\n    from pkg import a\n")
    mods = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    edges, private = _imports(mods)
    assert _cycles(edges) == [["pkg.a", "pkg.b"]]
    assert private == ["pkg.a imports _g from pkg.b"]
