"""`stagewise demo`: an offline study on real images that ship with scikit-learn.

scikit-learn's handwritten digits (1,797 scanned 8x8 images, UCI) become a small binary
cohort: "is this a 3 or an 8?" against the other digits would be too easy, so the task is
3 vs 8 alone, two scans per pseudo-patient so that grouping by patient matters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stagewise.recipe import Recipe, recipe_from_dict


def make_demo_cohort(folder: str | Path, per_class: int = 180) -> Path:
    """Write digit PNGs and a manifest (path, outcome, patient) into `folder`."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = []
    for label, digit in ((0, 3), (1, 8)):
        idx = np.flatnonzero(digits.target == digit)[:per_class]
        for i, j in enumerate(idx):
            name = f"images/d{digit}_{j:04d}.png"
            img = (digits.images[j] / 16.0 * 255).round().astype(np.uint8)
            Image.fromarray(img, mode="L").save(folder / name)
            rows.append({"path": name, "outcome": label, "patient": f"p{digit}_{i // 2:03d}"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def demo_recipe(manifest: Path) -> Recipe:
    """Two arms on identical folds: a linear probe only, and probe -> progressive unfreezing."""
    probe = {"kind": "probe", "epochs": 8, "batch_size": 32, "lr": 3e-3}
    thaw = {
        "kind": "thaw", "epochs": 6, "batch_size": 32, "schedule": "onecycle",
        "unfreeze": {"layer4": 0.0, "layer3": 0.3, "layer2": 0.6},
        "lr": {"head": 3e-3, "layer4": 1.5e-3, "layer3": 7.5e-4, "layer2": 3e-4},
        "augment": {"rotate": 10, "translate": 0.05}, "cutmix": {"alpha": 1.0, "p": 0.5},
    }
    return recipe_from_dict({
        "name": "demo-digits-3-vs-8",
        "seed": 0,
        "cohort": {"manifest": str(manifest), "image": "path", "outcome": "outcome", "patient": "patient"},
        "data": {"image_size": 32},
        "protocol": {"folds": 5, "repeats": 1},
        "arms": [
            {"name": "probe", "backbone": "scratch:resnet18", "stages": [probe]},
            {"name": "probe+thaw", "backbone": "scratch:resnet18", "stages": [probe, thaw]},
        ],
    }, source="demo")
