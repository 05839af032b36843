"""The package's shape: no import cycles (function-level imports included) and no module
importing another module's private names."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[2] / "src"
PACKAGE = "stagewise"


def _modules(src: Path = SRC) -> dict[str, Path]:
    mods = {}
    for f in (src / PACKAGE).rglob("*.py"):
        name = ".".join(f.relative_to(src).with_suffix("").parts)
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


LAYERS = [
    ("stagewise.errors", "stagewise.version"),
    ("stagewise.io", "stagewise.quiet", "stagewise.text", "stagewise.hosts"),
    ("stagewise.recipe", "stagewise.models"),
    ("stagewise.data",),
    ("stagewise.evaluation",),
    ("stagewise.report",),
    ("stagewise.training",),
    ("stagewise.federated",),
    ("stagewise.study",),
    ("stagewise.bundle",),
    ("stagewise.external", "stagewise.serve"),
    ("stagewise.cli",),
    ("stagewise.__main__",),
    ("stagewise",),
]
"""The package's layers, lowest first: a module may import its own package and the layers
below it, never a layer above nor a sibling package of its own layer. The study layer sits
above federated training (a study's federated arm calls into `federated/`; `federated/` never
reaches back), bundles above studies (a refit trains through the study layer), and the public
API (`stagewise/__init__.py`) above everything."""


def _layer_of(module: str) -> tuple[int, str]:
    for rank, packages in enumerate(LAYERS):
        for package in packages:
            if module == package or (package != "stagewise" and module.startswith(package + ".")):
                return rank, package
    raise AssertionError(f"{module} is in no layer of LAYERS: add it to the order")


def _upward_imports(mods: dict[str, Path]) -> list[str]:
    edges, _ = _imports(mods)
    wrong = []
    for module, targets in sorted(edges.items()):
        rank, package = _layer_of(module)
        for target in sorted(targets):
            t_rank, t_package = _layer_of(target)
            if t_package != package and t_rank >= rank:
                wrong.append(f"{module} (layer {rank}) imports {target} (layer {t_rank})")
    return wrong


def test_every_import_points_down_the_layers():
    assert _upward_imports(_modules()) == []


def test_the_layer_check_sees_an_upward_import_inside_a_function(tmp_path):
    pkg = tmp_path / PACKAGE
    for name, text in {"__init__.py": "", "data/__init__.py": "", "study/__init__.py": "",
                       "data/cohort.py": "def f():\n    from stagewise.study.runner import run_study\n",
                       "study/runner.py": "from stagewise.data.cohort import f\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    assert _upward_imports(_modules(tmp_path)) == [
        "stagewise.data.cohort (layer 3) imports stagewise.study.runner (layer 8)"]


def test_no_module_over_400_lines_and_no_function_over_80():
    """Small modules with one job: a module that grows past 400 lines or a function past 80
    is split (into named steps, or a module per concern) before it lands."""
    long = []
    for module, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert long == []
