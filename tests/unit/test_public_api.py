"""The public API (`import stagewise`): every advertised name resolves, importing the package
alone loads no torch, and every error stagewise raises for bad input shares one base."""

import subprocess
import sys
from pathlib import Path

import stagewise

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_public_name_resolves_and_the_readme_imports_only_public_names():
    for name in stagewise.__all__:
        assert getattr(stagewise, name) is not None, name
    imports = [line for line in README.read_text().splitlines() if line.startswith("from stagewise import ")]
    assert imports
    for line in imports:
        for name in line.removeprefix("from stagewise import ").split(","):
            assert name.strip() in stagewise.__all__, name


def test_importing_the_package_loads_no_torch():
    code = "import sys, stagewise; assert 'torch' not in sys.modules, 'torch loaded'; print(stagewise.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_error_class_derives_from_the_one_base():
    """Scans every module: an exception class stagewise defines is a StagewiseError (the CLI
    prints those without a traceback), except the HTTP problem the bedside server answers with."""
    import importlib
    import inspect
    import pkgutil

    found = {}
    for info in pkgutil.walk_packages(stagewise.__path__, "stagewise."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    assert len(found) >= 12
    outside = sorted(k for k, cls in found.items() if not issubclass(cls, stagewise.StagewiseError))
    assert outside == ["stagewise.serve.refusals.Problem"]
    # the classes keep their older bases, so callers catching ValueError etc. still do
    from stagewise.errors import RunError
    from stagewise.recipe import RecipeError

    assert issubclass(RecipeError, ValueError) and issubclass(RunError, RuntimeError)
