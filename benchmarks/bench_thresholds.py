"""Decision-threshold rules on the same folds: which rule gives decisions that hold on patients
the model never saw (issue: thresholds chosen on scores of a model that memorised its
training patients).

    python benchmarks/bench_thresholds.py [--size N] [--folds K] [--repeats R] [--epochs E]
                                          [--image-size PX] [--backbone SPEC] [--threads T]
                                          [--cohorts covid lus digits]

Per cohort and fold, the arm is trained once (exactly as `run_study` trains a pooled fold:
`Study.fit_predict`, the fold seed), and its inner out-of-fold scores come from the inner fits
a threshold with `on: inner_cv` makes (`evaluation.thresholds.inner_oof_scores`, the fold
seed). Every rule is then applied by `evaluation.fold_scores.score_fold`, the function a study
scores its folds with, so each rule is judged on the same models and the same test patients.
Printed per cohort and rule: test balanced accuracy, sensitivity and specificity (patient
level, mean ± sd over folds) and the thresholds; per cohort, the training AUROC and the extra
training time of the inner fits against the fold's own fit.

Cohorts (STAGEWISE_DATA, default ../shared/data): covid (covid-cxr-outcome, went_icu, via
examples/prepare_covid_outcome.py, at most --size patients per outcome), lus (lus-pocus frames, abnormal vs regular, patients =
group_id, at most --size frames per class) and digits (scikit-learn's scanned digits 3 vs 8,
the demo's cohort, --size images per class, two scans per patient).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from stagewise.evaluation.fold_scores import score_fold
from stagewise.evaluation.splits import fold_seed
from stagewise.evaluation.thresholds import inner_oof_scores
from stagewise.recipe import ThresholdRule, recipe_from_dict
from stagewise.study.demo import make_demo_cohort
from stagewise.study.fitting import SilentReporter, Study
from stagewise.study.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STAGEWISE_DATA", REPO.parent / "shared" / "data"))

RULES = {
    "youden / training": {"rule": "youden", "on": "training"},
    "youden / inner_cv": {"rule": "youden", "on": "inner_cv"},
    "sensitivity 0.9 / training": {"rule": "sensitivity", "value": 0.9, "on": "training"},
    "sensitivity 0.9 / inner_cv": {"rule": "sensitivity", "value": 0.9, "on": "inner_cv"},
    "specificity 0.9 / inner_cv": {"rule": "specificity", "value": 0.9, "on": "inner_cv"},
    "net_benefit 0.3 / inner_cv": {"rule": "net_benefit", "value": 0.3, "on": "inner_cv"},
    "prevalence / training": {"rule": "prevalence", "on": "training"},
    "fixed 0.5": {"fixed": 0.5},
}


def covid(tmp: Path, size: int) -> tuple[Path, dict]:
    out = tmp / "covid.csv"
    subprocess.run([sys.executable, str(REPO / "examples" / "prepare_covid_outcome.py"), "--data", str(DATA),
                    "--out", str(out)], check=True, capture_output=True)
    table = pd.read_csv(out)
    keep = table.groupby("went_icu")["patient"].unique().map(lambda p: list(p[:size])).sum()  # whole patients
    table[table["patient"].isin(keep)].to_csv(out, index=False)
    return out, {"outcome": "went_icu", "patient": "patient", "image": "path"}


def lus(tmp: Path, size: int) -> tuple[Path, dict]:
    frames = pd.read_csv(DATA / "lus-pocus" / "frames.csv")
    frames = frames[frames["label"] != "uncertain_viral_or_bacterial"]
    frames["abnormal"] = (frames["label"] != "regular").astype(int)
    mixed = frames.groupby("group_id")["abnormal"].nunique()
    frames = frames[~frames["group_id"].isin(mixed[mixed > 1].index)]
    frames = frames.groupby("abnormal").head(size)
    out = tmp / "lus.csv"
    frames.assign(path=[str(DATA / "lus-pocus" / p) for p in frames["png_file"]],
                  patient=frames["group_id"].astype(str))[["path", "abnormal", "patient"]].to_csv(out, index=False)
    return out, {"outcome": "abnormal", "patient": "patient", "image": "path"}


def digits(tmp: Path, size: int) -> tuple[Path, dict]:
    return make_demo_cohort(tmp / "digits", per_class=size), {"outcome": "outcome", "patient": "patient", "image": "path"}


COHORTS = {"covid": covid, "lus": lus, "digits": digits}


def with_rule(recipe, spec: dict):
    return recipe.model_copy(update={"protocol": recipe.protocol.model_copy(
        update={"threshold": ThresholdRule.model_validate(spec)})})


def bench(name: str, args, tmp: Path) -> None:
    manifest, columns = COHORTS[name](tmp, args.size)
    stages = [{"kind": "finetune", "epochs": args.epochs, "batch_size": 16, "lr": 1e-3}]
    recipe = recipe_from_dict({
        "name": f"thresholds-{name}", "seed": 0, "cohort": {"manifest": str(manifest), **columns},
        "data": {"image_size": args.image_size}, "protocol": {"folds": args.folds, "repeats": args.repeats},
        "compute": {"device": "cpu", "precision": "fp32", "channels_last": False, "reuse_frozen": False,
                    "threads": args.threads},
        "evaluation": {"saliency": 0, "report": False},
        "arms": [{"name": "finetune", "backbone": args.backbone, "stages": stages}],
    })
    study = Study(recipe, RunDir(tmp / f"{name}-run"), SilentReporter())
    arm = recipe.arms[0]
    t = study.cohort.table
    print(f"\n== {name}: {len(t)} images, {t['patient'].nunique()} patients, "
          f"{int(t.groupby('patient')['y'].first().sum())} positive patients; {args.backbone} finetune "
          f"{args.epochs} epochs, {args.image_size} px, {args.folds} folds x {args.repeats} repeats, inner folds 3 ==")
    rows, fit_s, inner_s = [], [], []
    for split in study.splits:
        seed = fold_seed(recipe.seed, split)
        train = split.train
        t0 = time.perf_counter()
        p_train_test = study.fit_predict(arm, arm, train, np.concatenate([train, split.test]), seed)
        fit_s.append(time.perf_counter() - t0)
        p_train, p_test = p_train_test[: len(train)], p_train_test[len(train):]
        t0 = time.perf_counter()
        p_inner = inner_oof_scores(train, study.y, study.patients, 3, seed,
                                   lambda a, b: study.fit_predict(arm, arm, a, b, seed))
        inner_s.append(time.perf_counter() - t0)
        print(f"  {split.name}: fold fit {fit_s[-1]:.0f} s, inner fits {inner_s[-1]:.0f} s", flush=True)
        for label, spec in RULES.items():
            m, _ = score_fold(with_rule(recipe, spec), study.cohort, split, train, p_train, p_test, p_inner=p_inner)
            rows.append({"rule": label, "split": split.name, **{k: m[k] for k in (
                "balanced_accuracy", "sensitivity", "specificity", "threshold", "train_auroc", "auroc")},
                "inner_auroc": m.get("inner_auroc", np.nan), "unreliable": m["threshold_unreliable"]})
    df = pd.DataFrame(rows)
    first = df[df["rule"] == "youden / inner_cv"]
    print(f"test AUROC {first['auroc'].mean():.3f} ± {first['auroc'].std():.3f}; training AUROC "
          f"{first['train_auroc'].mean():.3f} (min {first['train_auroc'].min():.3f}); inner out-of-fold AUROC "
          f"{first['inner_auroc'].mean():.3f}; folds with training AUROC >= 0.99: "
          f"{int((first['train_auroc'] >= 0.99).sum())}/{len(first)}")
    print(f"time per fold: fold fit {np.mean(fit_s):.1f} s, inner fits {np.mean(inner_s):.1f} s "
          f"(+{100 * np.sum(inner_s) / np.sum(fit_s):.0f} % training time)")
    print(f"{'rule':28s} {'balanced acc.':>15s} {'sensitivity':>15s} {'specificity':>15s} {'thresholds':>17s}")
    for label in RULES:
        d = df[df["rule"] == label]
        cell = lambda c: f"{d[c].mean():.3f} ± {d[c].std():.3f}"  # noqa: E731
        print(f"{label:28s} {cell('balanced_accuracy'):>15s} {cell('sensitivity'):>15s} {cell('specificity'):>15s} "
              f"{d['threshold'].min():8.3f}-{d['threshold'].max():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=100,
                        help="covid: patients per outcome; lus: frames per class; digits: images per class")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--backbone", default="scratch:resnet18")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine wastes less)")
    parser.add_argument("--cohorts", nargs="+", default=list(COHORTS), choices=list(COHORTS))
    args = parser.parse_args()
    print("stagewise threshold-rule benchmark")
    print("command: python benchmarks/bench_thresholds.py " + " ".join(sys.argv[1:]))
    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch threads {args.threads}; "
          f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cohorts:
            bench(name, args, Path(tmp))
    print(f"\nwall {time.perf_counter() - t0:.0f} s; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
