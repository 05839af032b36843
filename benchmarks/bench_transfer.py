"""Pretraining and multi-task figures on real data.

    python benchmarks/bench_transfer.py --transfer   # pediatric CXR pretraining -> covid ICU outcome
    python benchmarks/bench_transfer.py --lus        # label efficiency on lung ultrasound: SSL vs scratch
    python benchmarks/bench_transfer.py --shared     # inference for K = 3 tasks: one backbone vs three models
    python benchmarks/bench_transfer.py --quick ...  # seconds-long smoke run of the chosen modes

Data come from STAGEWISE_DATA (default: ../shared/data beside the repository). Each study
runs through `stagewise.study.run_study`; what is printed comes from its metrics.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from stagewise.recipe import recipe_from_dict
from stagewise.study import run_study

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STAGEWISE_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(Path(__file__).parent))
from bench_efficiency import machine  # noqa: E402


def _print_study(metrics: dict) -> None:
    ev = metrics["evidence"]
    for name, arm in metrics["arms"].items():
        s, ci = arm["summary"]["auroc"], ev["units"][name].get("bootstrap_ci", {}).get("auroc")
        cis = f"  pooled AUROC {ci['point']:.3f} (95 % CI {ci['low']:.3f}-{ci['high']:.3f})" if ci else ""
        pre = "".join(f"  [{k}: {v['median_seconds_per_fold']:.0f} s]" for k, v in arm.get("resources", {}).items())
        print(f"  {name:28s} AUROC {s['mean']:.3f} ± {s['sd']:.3f} over {s['n']} folds{cis}{pre}")
    for c in ev["comparisons"]:
        d = c.get("delong")
        if d:
            print(f"  {c['a']} vs {c['b']}: ΔAUROC {d['diff']:+.3f} (95 % CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}), "
                  f"DeLong p = {d['p']:.3f}; corrected t p = {c.get('corrected_t', {}).get('p', float('nan')):.3f}")


def bench_transfer(quick: bool, tmp: Path) -> None:
    labels = pd.read_csv(DATA / "cxr-pediatric-pneumonia" / "labels.csv")
    labels = labels[labels["dup_group"].isna() | ~labels["dup_group"].duplicated()]  # one image per duplicate group
    if quick:
        labels = labels.groupby("label").head(40)
    source = tmp / "pneumonia.csv"
    labels.assign(path=[str(DATA / "cxr-pediatric-pneumonia" / p) for p in labels["png_file"]])[["path", "label"]].to_csv(source, index=False)
    target = tmp / "covid.csv"
    subprocess.run([sys.executable, str(REPO / "examples" / "prepare_covid_outcome.py"), "--data", str(DATA), "--out", str(target)],
                   check=True, capture_output=True)
    e = (lambda n: 1) if quick else (lambda n: n)
    src = {"manifest": str(source), "targets": ["label"], "task": "classification"}
    fold_stages = [
        {"kind": "probe", "epochs": e(6), "batch_size": 16, "lr": 3e-3},
        {"kind": "thaw", "epochs": e(6), "batch_size": 16, "schedule": "onecycle", "lr_decay": 0.5, "lr": 1e-3,
         "unfreeze": {"layer4": 0.0, "layer3": 0.25, "layer2": 0.5}, "augment": {"flip": True, "rotate": 5}},
    ]
    arms = [
        {"name": "scratch", "backbone": "scratch:resnet18", "stages": fold_stages},
        {"name": "supervised-pretrained", "backbone": "scratch:resnet18",
         "stages": [{"kind": "pretrain", "epochs": e(3), "batch_size": 32, "lr": 1e-3, "source": src,
                     "augment": {"flip": True, "rotate": 5}}, *fold_stages]},
        {"name": "ssl-pretrained", "backbone": "scratch:resnet18",
         "stages": [{"kind": "ssl", "method": "simclr", "epochs": e(3), "batch_size": 64, "lr": 1e-3,
                     "source": {"manifest": str(source)}}, *fold_stages]},
    ]
    recipe = recipe_from_dict({
        "name": "transfer", "seed": 0,
        "cohort": {"manifest": str(target), "outcome": "went_icu", "patient": "patient", "image": "path"},
        "data": {"image_size": 64 if quick else 96}, "protocol": {"folds": 2 if quick else 5, "test_images": "first"},
        "evaluation": {"saliency": 0, "bootstrap": 200 if quick else 2000, "report": False}, "arms": arms,
    })
    t0 = time.perf_counter()
    result = run_study(recipe, tmp / "transfer-run")
    print(f"transfer: source {len(labels)} pediatric CXRs (3 classes), target covid-cxr-outcome went_icu, "
          f"{recipe.data.image_size} px, {result.metrics['compute']}, wall {time.perf_counter() - t0:.0f} s")
    _print_study(result.metrics)


def bench_lus(quick: bool, tmp: Path) -> None:
    frames = pd.read_csv(DATA / "lus-pocus" / "frames.csv")
    frames = frames[frames["label"] != "uncertain_viral_or_bacterial"]
    frames["abnormal"] = (frames["label"] != "regular").astype(int)
    mixed = frames.groupby("group_id")["abnormal"].nunique()
    frames = frames[~frames["group_id"].isin(mixed[mixed > 1].index)]  # a patient with one outcome only
    if quick:
        frames = frames.groupby("abnormal").head(60)
    manifest = tmp / "lus.csv"
    frames.assign(path=[str(DATA / "lus-pocus" / p) for p in frames["png_file"]],
                  patient=frames["group_id"].astype(str))[["path", "abnormal", "patient"]].to_csv(manifest, index=False)
    e = (lambda n: 1) if quick else (lambda n: n)
    supervised = [{"kind": "probe", "epochs": e(6), "batch_size": 32, "lr": 3e-3},
                  {"kind": "finetune", "epochs": e(4), "batch_size": 32, "lr": 3e-4, "augment": {"flip": True, "rotate": 5}}]
    arms = [
        {"name": "scratch", "backbone": "scratch:resnet18", "stages": supervised},
        {"name": "ssl", "backbone": "scratch:resnet18",
         "stages": [{"kind": "ssl", "source": "target", "method": "simclr", "epochs": e(5), "batch_size": 64, "lr": 1e-3},
                    *supervised]},
    ]
    recipe = recipe_from_dict({
        "name": "lus-label-efficiency", "seed": 0,
        "cohort": {"manifest": str(manifest), "outcome": "abnormal", "patient": "patient", "image": "path"},
        "data": {"image_size": 64}, "protocol": {"folds": 3, "label_fractions": [0.01, 0.1]},
        "evaluation": {"saliency": 0, "bootstrap": 200 if quick else 1000, "report": False}, "arms": arms,
    })
    t0 = time.perf_counter()
    result = run_study(recipe, tmp / "lus-run")
    n_patients = frames["group_id"].nunique()
    print(f"lus-pocus abnormal vs regular: {len(frames)} frames, {n_patients} patients, 64 px, {result.metrics['compute']}, "
          f"3 grouped folds; ssl on each fold's training frames (labels unused), supervised stages on the fraction; "
          f"wall {time.perf_counter() - t0:.0f} s")
    for arm, curve in result.metrics["evidence"]["label_efficiency"].items():
        print(f"  {arm:8s} " + "  ".join(f"{p['fraction']:>5.0%}: AUROC {p['auroc_mean']:.3f} ± {p['auroc_sd']:.3f}" for p in curve))


def bench_shared(quick: bool) -> None:
    from stagewise.bundle.network import SharedHeads
    from stagewise.models import Head, create_backbone

    size, k, batch = (64, 3, 4) if quick else (224, 3, 16)
    torch.manual_seed(0)
    backbone = create_backbone("scratch:resnet50").eval()
    heads = {f"task{i}": Head(backbone.feature_dim, 1, dropout=0.0, hidden=256).eval() for i in range(k)}
    shared = SharedHeads(backbone, heads).eval()
    separate = [SharedHeads(create_backbone("scratch:resnet50").eval(), {n: h}).eval() for n, h in heads.items()]
    for model in separate:  # K fine-tuned copies would differ; equal weights make the outputs comparable
        model.backbone.load_state_dict(backbone.state_dict())
    x = torch.rand(batch, 1, size, size)

    def timed(fn, runs):
        fn()
        out = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        t_shared = timed(lambda: shared(x), 2 if quick else 5)
        t_sep = timed(lambda: torch.cat([m(x) for m in separate], dim=1), 2 if quick else 5)
    with torch.no_grad():
        diff = float((shared(x) - torch.cat([m(x) for m in separate], dim=1)).abs().max())
    print(f"K = {k} tasks, ResNet-50 at {size} px, batch {batch}, bf16 CPU: shared backbone {batch / t_shared:.1f} img/s, "
          f"three models {batch / t_sep:.1f} img/s: {100 * (1 - t_shared / t_sep):.0f} % less inference time "
          f"(max |diff| fp32 {diff:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--transfer", "--lus", "--shared", "--quick"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.shared:
            bench_shared(args.quick)
        if args.transfer:
            bench_transfer(args.quick, Path(tmp))
        if args.lus:
            bench_lus(args.quick, Path(tmp))


if __name__ == "__main__":
    main()
