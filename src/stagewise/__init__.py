"""stagewise: staged transfer learning on small clinical imaging cohorts.

The public API, for scripts and notebooks::

    from stagewise import load_recipe, run_study, export_bundle, Bundle

    recipe = load_recipe("study.yaml")
    result = run_study(recipe, "runs/study")          # cross-validated arms, report.html
    export_bundle("runs/study", "probe+thaw", "bundles/bpd")
    Bundle("bundles/bpd").predict(["cxr-001.dcm"])

Names are imported on first use, so `import stagewise` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib

from stagewise.errors import StagewiseError
from stagewise.version import __version__

_PUBLIC = {
    "load_recipe": "stagewise.recipe",
    "recipe_from_dict": "stagewise.recipe",
    "Recipe": "stagewise.recipe",
    "run_study": "stagewise.study",
    "check_study": "stagewise.study",
    "refit": "stagewise.study",
    "StudyResult": "stagewise.study",
    "SilentReporter": "stagewise.study",
    "export_bundle": "stagewise.bundle",
    "Bundle": "stagewise.bundle",
    "evaluate_bundle": "stagewise.external",
    "evaluate_across_sites": "stagewise.external",
    "create_backbone": "stagewise.models",
    "list_sources": "stagewise.models",
    "list_archs": "stagewise.models",
}

__all__ = ["StagewiseError", "__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'stagewise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
