"""`stagewise demo`: an offline study on real images that ship with scikit-learn, where the
staging visibly matters.

scikit-learn's handwritten digits (1,797 scanned 8x8 images, UCI) play a small clinical
cohort and a large public source. The target task is a hard pair (`TARGET`: a 4 or a 9?)
with few labelled patients (two scans each), as a hospital's cohort would have; every
image of the other eight digits is the source of a supervised pretraining stage, as a
public dataset of another task would be. Three arms on the same patient-grouped folds:
the same tiny CNN trained from scratch on the few labelled patients, pretrained on the
other digits and then only its head trained (probe), and pretrained, probed and then
thawed (progressive unfreezing). The report's comparison, calibration and decision curves
then show differences that a newcomer can read.

`make_demo_cohort` (3 vs 8, every scan) is kept as the small real-image cohort the tests use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stagewise.recipe import Recipe, recipe_from_dict

TARGET = (1, 8)
"""The demo's pair of digits (outcome 0, outcome 1): among the pairs a small CNN confuses most."""
DEMO_PATIENTS = 20
"""Labelled patients per outcome in the demo's cohort (two scans each)."""
DEMO_PIXELS = 4
"""The demo's scans are 4x4 pixels (each 2x2 block of the 8x8 scan averaged): a low-resolution modality."""


def _save(folder: Path, digits, j: int, pixels: int = 8) -> str:
    """One scan as an 8x8 PNG holding `pixels` x `pixels` of detail (8: as scanned; 4: each
    2x2 block averaged, as a scanner of half the resolution would see it)."""
    name = f"images/d{digits.target[j]}_{j:04d}.png"
    f = 8 // pixels
    coarse = digits.images[j].reshape(pixels, f, pixels, f).mean((1, 3))
    img = (np.kron(coarse, np.ones((f, f))) / 16.0 * 255).round().astype(np.uint8)
    Image.fromarray(img, mode="L").save(folder / name)
    return name


def make_demo_cohort(folder: str | Path, per_class: int = 180) -> Path:
    """Write digit PNGs and a manifest (path, outcome, patient) of 3 (outcome 0) vs 8
    (outcome 1), two scans per patient, into `folder`."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = []
    for label, digit in ((0, 3), (1, 8)):
        idx = np.flatnonzero(digits.target == digit)[:per_class]
        for i, j in enumerate(idx):
            rows.append({"path": _save(folder, digits, j), "outcome": label, "patient": f"p{digit}_{i // 2:03d}"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def make_demo_study(folder: str | Path, patients: int = DEMO_PATIENTS, pixels: int = DEMO_PIXELS) -> tuple[Path, Path]:
    """The demo's cohort (the `TARGET` pair, `patients` per outcome, two scans each) and its
    pretraining source (every scan of the other digits, labelled with its digit), as PNGs
    with two manifests in `folder`; returns (cohort manifest, source manifest)."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rows = []
    for label, digit in enumerate(TARGET):
        idx = np.flatnonzero(digits.target == digit)[: 2 * patients]
        rows += [{"path": _save(folder, digits, j, pixels), "outcome": label, "patient": f"p{digit}_{i // 2:03d}"}
                 for i, j in enumerate(idx)]
    source = [{"path": _save(folder, digits, j, pixels), "digit": int(digits.target[j])}
              for j in np.flatnonzero(~np.isin(digits.target, TARGET))]
    cohort, pretrain = folder / "manifest.csv", folder / "source.csv"
    pd.DataFrame(rows).to_csv(cohort, index=False)
    pd.DataFrame(source).to_csv(pretrain, index=False)
    return cohort, pretrain


def demo_recipe(manifest: Path, source: Path) -> Recipe:
    """Three arms of one tiny CNN on identical folds: from scratch, pretrained -> probe, and
    pretrained -> probe -> thaw."""
    pretrain = {"kind": "pretrain", "epochs": 4, "batch_size": 64, "lr": 3e-3,
                "source": {"manifest": str(source), "targets": ["digit"], "task": "classification"}}
    probe = {"kind": "probe", "epochs": 10, "batch_size": 16, "lr": 1e-2}
    thaw = {"kind": "thaw", "epochs": 6, "batch_size": 16, "schedule": "onecycle",
            "unfreeze": {"block3": 0.0, "block2": 0.4},
            "lr": {"head": 3e-3, "block3": 1.5e-3, "block2": 7.5e-4}, "augment": {"rotate": 10, "translate": 0.05}}
    scratch = {"kind": "finetune", "epochs": 16, "batch_size": 16, "lr": 3e-3,
               "augment": {"rotate": 10, "translate": 0.05}}
    return recipe_from_dict({
        "name": f"demo-digits-{TARGET[0]}-vs-{TARGET[1]}",
        "seed": 0,
        "cohort": {"manifest": str(manifest), "image": "path", "outcome": "outcome", "patient": "patient"},
        "data": {"image_size": 16},
        "protocol": {"folds": 5, "repeats": 1},
        # 500 patient resamples (default 2000): the bootstrap of three units took longer than their training
        "evaluation": {"bootstrap": 500, "compare": [
            ["pretrained+probe", "scratch"], ["pretrained+probe+thaw", "scratch"],
            ["pretrained+probe+thaw", "pretrained+probe"]]},
        "arms": [
            {"name": "scratch", "backbone": "scratch:tinycnn", "stages": [scratch]},
            {"name": "pretrained+probe", "backbone": "scratch:tinycnn", "stages": [pretrain, probe]},
            {"name": "pretrained+probe+thaw", "backbone": "scratch:tinycnn", "stages": [pretrain, probe, thaw]},
        ],
    }, source="demo")
