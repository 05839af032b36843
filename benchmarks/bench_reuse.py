"""The BPD paper's protocol exactly vs with frozen-prefix reuse (issue 13): wall time and AUROC.

Two arms on the same folds of a real cohort (a paired design, so the study's own evidence
gives the AUROC difference with DeLong and the corrected resampled t-test):

  exact: the protocol as the BPD code runs it (examples/bpd.yaml): a 10-epoch head-only probe,
         then 20 epochs of progressive unfreezing (layer4 / layer3 / layer2 at 10 / 30 / 60 %),
         BatchNorm in train mode (`bn: adapt`), flip + rotation + resized crop + blur + pixel
         masking on every batch's images, CutMix on half of the thaw batches, batch 8,
         inverse-frequency sampling. Nothing frozen can be cached: every batch runs the whole
         network.
  fast:  the same with `bn: adapt_once` (AdaBN once per stage on the fold's training images) and
         `augment_on: features` (warp, crop, masking and CutMix on the cached output of the
         frozen groups; blur, a pixel-value operation, dropped). Each epoch resumes from the
         deepest group still frozen.

Cohorts (from STAGEWISE_DATA, default ../shared/data): the covid example (ICU admission from
the first chest radiograph, examples/prepare_covid_outcome.py's manifest) and lung ultrasound
(abnormal vs regular; `--lus-frames` frames per video). Backbone: ResNet-18, random init (no
pretrained weights can be fetched here), 64 px on this 2-core CPU; `--size` and `--backbone`
for more.

    python benchmarks/bench_reuse.py [--cohorts covid lus] [--size 64] [--repeats 2] [--folds 5]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from stagewise.recipe import recipe_from_dict
from stagewise.study import run_study
from stagewise.training.autotune import cpu_model

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STAGEWISE_DATA", REPO.parent / "shared" / "data"))

AUGMENT = {"flip": True, "rotate": 5, "crop": {"scale": [0.95, 1.05]}, "blur": {"kernel": 9, "sigma": [0.05, 2.0], "p": 0.5},
           "mask": {"fraction": 0.25, "p": 0.1, "value": 0.5}}
PROBE = {"kind": "probe", "epochs": 10, "batch_size": 8, "lr": 1e-3, "weight_decay": 1e-4, "bn": "adapt",
         "augment": AUGMENT, "balanced_sampling": True}
THAW = {"kind": "thaw", "epochs": 20, "batch_size": 8, "schedule": "onecycle", "bn": "adapt",
        "unfreeze": {"layer4": 0.1, "layer3": 0.3, "layer2": 0.6},
        "lr": {"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4},
        "weight_decay": {"head": 1e-5, "layer4": 1e-4, "layer3": 1e-4, "layer2": 1e-4},
        "augment": AUGMENT, "cutmix": {"alpha": 1.0, "p": 0.5}, "balanced_sampling": True}


def fast(stage: dict) -> dict:
    """The stage with frozen-prefix reuse: AdaBN once, augmentation on the frozen groups' output."""
    out = copy.deepcopy(stage)
    out["bn"] = "adapt_once"
    out["augment_on"] = "features"
    out["augment"].pop("blur")
    out["augment"]["mask"]["value"] = 0.0
    return out


def covid_manifest(tmp: Path) -> tuple[Path, dict]:
    sys.path.insert(0, str(REPO / "examples"))
    from prepare_covid_outcome import build_manifest

    table, _ = build_manifest(DATA)
    path = tmp / "covid.csv"
    table.to_csv(path, index=False)
    return path, {"outcome": "went_icu", "positive": ["Y"], "negative": ["N"], "patient": "patient", "image": "path"}


def lus_manifest(tmp: Path, per_video: int) -> tuple[Path, dict]:
    frames = pd.read_csv(DATA / "lus-pocus" / "frames.csv")
    frames = frames[frames["label"] != "uncertain_viral_or_bacterial"]
    frames["abnormal"] = (frames["label"] != "regular").astype(int)
    mixed = frames.groupby("group_id")["abnormal"].nunique()
    frames = frames[~frames["group_id"].isin(mixed[mixed > 1].index)]  # one outcome per patient
    frames = frames.groupby("source_id", sort=False).head(per_video)  # a few frames of each video
    path = tmp / "lus.csv"
    frames.assign(path=[str(DATA / "lus-pocus" / p) for p in frames["png_file"]],
                  patient=frames["group_id"].astype(str))[["path", "abnormal", "patient"]].to_csv(path, index=False)
    return path, {"outcome": "abnormal", "patient": "patient", "image": "path"}


def bench(name: str, manifest: Path, cohort: dict, args, tmp: Path) -> None:
    backbone = f"scratch:{args.backbone}"
    probe, thaw = (PROBE | {"epochs": 2}, THAW | {"epochs": 4}) if args.quick else (PROBE, THAW)
    recipe = recipe_from_dict({
        "name": f"reuse-{name}", "seed": 0,
        "cohort": {"manifest": str(manifest), **cohort},
        "data": {"image_size": args.size, "resize": "stretch"},
        "protocol": {"folds": args.folds, "repeats": args.repeats, "test_images": "first"},
        "compute": {"device": "cpu", "precision": args.precision, "channels_last": False},
        "evaluation": {"saliency": 0, "bootstrap": 1000, "report": False, "clinical_model": False,
                       "compare": [["fast", "exact"]], "primary": {"a": "fast", "b": "exact", "test": "corrected_t"}},
        "arms": [
            {"name": "exact", "backbone": backbone, "stages": [probe, thaw]},
            {"name": "fast", "backbone": backbone, "stages": [fast(probe), fast(thaw)]},
        ],
    })
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    result = run_study(recipe, tmp / f"run-{name}")
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    m = result.metrics
    units, ev = m["arms"], m["evidence"]
    n = m["cohort"]
    print(f"\n== {name}: {n.get('images')} images, {n.get('patients')} patients ({n.get('positive_patients')} positive), "
          f"{args.size} px {backbone}, "
          f"{args.repeats}x{args.folds} folds, {m['compute']}; wall {wall:.0f} s; load {load0[0]:.2f} -> {load1[0]:.2f} ==")
    secs = {}
    for arm in ("exact", "fast"):
        s, e = units[arm]["summary"]["auroc"], ev["units"][arm]
        secs[arm] = units[arm]["train_seconds"]
        ci = e.get("bootstrap_ci", {}).get("auroc", e.get("auroc_delong_ci", {}))
        print(f"  {arm:6s} train {secs[arm]:7.1f} s | fold AUROC {s['mean']:.3f} ± {s['sd']:.3f} | pooled "
              f"{ci.get('point', float('nan')):.3f} [{ci.get('low', float('nan')):.3f}, {ci.get('high', float('nan')):.3f}]")
    comp = next(c for c in ev["comparisons"] if c["a"] == "fast" and c["b"] == "exact")
    t, d = comp.get("corrected_t", {}), comp.get("delong", {})
    print(f"  time ratio exact / fast: {secs['exact'] / secs['fast']:.2f}x (training seconds, same folds, same run)")
    print(f"  fast - exact, fold AUROC: {t.get('mean_diff', float('nan')):+.3f} [{t.get('ci_low', float('nan')):+.3f}, "
          f"{t.get('ci_high', float('nan')):+.3f}], corrected resampled t p = {t.get('p', float('nan')):.3f}")
    print(f"  fast - exact, pooled AUROC (DeLong): {d.get('diff', float('nan')):+.3f} [{d.get('ci_low', float('nan')):+.3f}, "
          f"{d.get('ci_high', float('nan')):+.3f}], p = {d.get('p', float('nan')):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohorts", nargs="+", default=["covid", "lus"], choices=["covid", "lus"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lus-frames", type=int, default=2, help="frames per lung-ultrasound video")
    parser.add_argument("--quick", action="store_true", help="2 probe + 4 thaw epochs: checks the script, not a result")
    args = parser.parse_args()
    cpu = cpu_model()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; load {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.cohorts:
            manifest, cohort = covid_manifest(tmp) if name == "covid" else lus_manifest(tmp, args.lus_frames)
            bench(name, manifest, cohort, args, tmp)


if __name__ == "__main__":
    main()
