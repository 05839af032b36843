"""Fixed recipes give the numbers they gave when this snapshot was recorded: a pooled
probe -> thaw arm, an ssl -> finetune arm, a federated arm (Flower's simulation), a local arm,
a nested-CV arm, each on the same small digits cohort over three hospitals, and the demo's
recipe on its own cohort (its arms must differ). A restructuring of the code must leave every prediction and metric unchanged.

The snapshot (`behaviour_snapshot.json`) was recorded on an x86-64 CPU at fp32 with one torch
thread and AVX2 kernels (`PINNED`: torch's and oneDNN's, on any x86-64 CPU, in a process
of its own); probabilities are compared to 1e-4 and the figures to 1e-3 (a changed training
would move them by far more). On the machine that recorded it the numbers were bit-identical
before and after the package was reorganised.

Record again (only when a change is meant to alter the numbers, and say so in its commit):
`python3 tests/e2e/test_same_behaviour.py --record`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SNAPSHOT = Path(__file__).with_name("behaviour_snapshot.json")
PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""The kernels the snapshot is computed with: AVX2 on every x86-64 CPU. AVX-512 kernels round
differently and training amplifies it (the demo's augmented arms moved by up to 0.09 on an
AVX-512 machine); these settings are read when torch loads, hence a process of their own."""
PROBE = {"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}
THAW = {"kind": "thaw", "epochs": 2, "batch_size": 16, "lr": 1e-3, "unfreeze": {"block3": 0.0, "block2": 0.5}}
EXACT = {"device": "cpu", "precision": "fp32", "channels_last": False, "threads": 1}
QUIET = {"bootstrap": 50, "saliency": 0, "report": False}


def sites_cohort(folder: Path) -> Path:
    from stagewise.study.demo import make_demo_cohort

    manifest = make_demo_cohort(folder / "digits", per_class=40)
    table = pd.read_csv(manifest)
    table["path"] = [str(manifest.parent / p) for p in table["path"]]
    patients = table["patient"].unique()
    table["hospital"] = table["patient"].map({p: "ABC"[i % 3] for i, p in enumerate(patients)})
    table.to_csv(folder / "sites.csv", index=False)
    return folder / "sites.csv"


def recipes(manifest: Path) -> dict:
    from stagewise.recipe import recipe_from_dict
    from stagewise.study.demo import demo_recipe, make_demo_study

    def recipe(arms):
        return recipe_from_dict({"name": "snap", "seed": 0, "cohort": {"manifest": str(manifest), "site": "hospital"},
                                 "data": {"image_size": 32}, "protocol": {"folds": 2, "repeats": 1}, "compute": EXACT,
                                 "evaluation": QUIET, "arms": arms})

    demo = demo_recipe(*make_demo_study(manifest.parent / "demo")).model_dump(mode="json")  # its own cohort
    demo["protocol"]["folds"], demo["compute"] = 2, EXACT
    demo["evaluation"] |= QUIET
    return {
        "pooled_probe_thaw": recipe([{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE, THAW]}]),
        "ssl_finetune": recipe([{"name": "a", "backbone": "scratch:tinycnn", "stages": [
            {"kind": "ssl", "source": "target", "epochs": 1, "batch_size": 16, "lr": 1e-3},
            {"kind": "finetune", "epochs": 1, "batch_size": 16, "lr": 1e-3}]}]),
        "federated": recipe([{"name": "a", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
                              "stages": [{**PROBE, "epochs": 1, "rounds": 2}, {**THAW, "epochs": 1, "rounds": 1}]}]),
        "local": recipe([{"name": "a", "backbone": "scratch:tinycnn", "sites": {"mode": "local"}, "stages": [PROBE]}]),
        "nested_cv": recipe([{"name": "a", "backbone": "scratch:tinycnn", "stages": [PROBE],
                              "tune": {"grid": {"stages.0.lr": [1e-3, 1e-2]}, "inner_folds": 2}}]),
        "demo": recipe_from_dict(demo),
    }


def outcome(recipe, run_dir: Path) -> dict:
    """Every prediction (by arm, fold and image) and every fold's figures."""
    from stagewise.study import SilentReporter, run_study

    result = run_study(recipe, run_dir, SilentReporter())
    p = result.predictions.copy()
    p["image"] = [Path(str(v)).name for v in p["image"]]
    p = p.sort_values(["arm", "repeat", "fold", "image"])
    figures = {f"{arm}/{f['repeat']}-{f['fold']}/{name}": value
               for arm, unit in result.metrics["arms"].items() for f in unit["folds"]
               for name, value in f.items()  # numbers only: a flag (threshold_unreliable) is no figure
               if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("repeat", "fold")}
    return {"predictions": {f"{r.arm}/{r.repeat}-{r.fold}/{r.image}": float(r.prob) for r in p.itertuples()},
            "figures": figures}


def compute_outcomes(folder: Path) -> dict:
    """Every recipe's outcome on the snapshot cohort, in this process (the child of `outcomes`)."""
    import torch

    torch.set_num_threads(1)
    manifest = sites_cohort(folder)
    return {name: outcome(r, folder / name) for name, r in recipes(manifest).items()}


def outcomes(folder: Path) -> dict:
    """Every recipe's outcome, computed in a child process with the `PINNED` kernels."""
    out = folder / "outcomes.json"
    child = subprocess.run([sys.executable, __file__, "--outcomes", str(folder), str(out)], env=os.environ | PINNED,
                           capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(out.read_text())


def record() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(json.dumps(outcomes(Path(tmp)), indent=0, sort_keys=True, allow_nan=True) + "\n")


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    return outcomes(tmp_path_factory.mktemp("snapshot"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["pooled_probe_thaw", "ssl_finetune", "federated", "local", "nested_cv", "demo"])
def test_a_fixed_recipe_gives_its_recorded_numbers(name, computed):
    got = computed[name]
    want = json.loads(SNAPSHOT.read_text())[name]
    assert sorted(got["predictions"]) == sorted(want["predictions"])
    keys = sorted(want["predictions"])
    np.testing.assert_allclose([got["predictions"][k] for k in keys], [want["predictions"][k] for k in keys], atol=1e-4)
    assert sorted(got["figures"]) == sorted(want["figures"])
    keys = sorted(want["figures"])
    np.testing.assert_allclose([got["figures"][k] for k in keys], [want["figures"][k] for k in keys], atol=1e-3,
                               equal_nan=True)
    if name == "demo":  # the demo must show why staging matters: its arms differ, and not at a ceiling
        auroc = {arm: np.mean([v for k, v in got["figures"].items() if k.startswith(f"{arm}/") and k.endswith("/auroc")])
                 for arm in ("scratch", "pretrained+probe", "pretrained+probe+thaw")}
        assert max(auroc.values()) - min(auroc.values()) >= 0.02 and min(auroc.values()) < 0.99, auroc


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    record()
elif __name__ == "__main__" and sys.argv[1:2] == ["--outcomes"]:
    Path(sys.argv[3]).write_text(json.dumps(compute_outcomes(Path(sys.argv[2])), allow_nan=True))
