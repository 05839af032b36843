"""A federated evaluation of one bundle across the three covid-multisite sites: the pooled
AUROC from the sites' summed score histograms against scikit-learn's AUROC on the pooled
patient scores (what a central evaluation of the three manifests computes).

    nice -n 10 python benchmarks/bench_federated_evaluation.py [--size 64] [--bins 100] [--out DIR]

The bundle: examples/covid-multisite.yaml's pooled arm (random-init ResNet-18, probe -> thaw)
at `--size` px with short schedules (3 + 3 epochs), 2 folds, fold r0-f0's model exported. It
is then evaluated on every patient of the three sites (hannover, southern-europe, elsewhere
from examples/prepare_covid_outcome.py), half of whom it was trained on: the AUROC itself is
optimistic and is not the point; the agreement of the federated figures with the central
ones is. The evaluation runs in Flower's simulation engine, one virtual site per manifest.
Prints both AUROCs, the stated bound with the default bins (equal-width plus edges at the
bundle's development quantiles) and with equal-width bins alone, the pooled counts, the
wall time, the machine and the load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples"))

from bench_core import loadavg  # noqa: E402
from prepare_covid_outcome import build_manifest, default_data  # noqa: E402
from stagewise.training.autotune import cpu_model  # noqa: E402


def recipe(manifest: Path, size: int) -> dict:
    r = yaml.safe_load((REPO / "examples" / "covid-multisite.yaml").read_text())
    pooled = next(a for a in r["arms"] if a["name"] == "pooled")
    pooled["stages"] = [dict(s, epochs=3) for s in pooled["stages"]]
    r["arms"] = [pooled]
    r["cohort"]["manifest"] = str(manifest)
    r["data"]["image_size"] = size
    r["protocol"] |= {"folds": 2}
    r["compute"] = {"save_models": True, "device": "cpu"}
    r["evaluation"] = {"bootstrap": 0, "saliency": 0, "report": False}
    return {k: v for k, v in r.items() if not k.startswith("x-")}


def central_scores(bundle_dir: Path, manifests: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """One score per patient, as `stagewise evaluate` makes them, over all the manifests."""
    from stagewise.bundle import Bundle
    from stagewise.external import ExternalOptions
    from stagewise.external.manifest import bundle_recipe, load_external, patient_table, score_cohort

    bundle, ys, ss = Bundle.load(bundle_dir), [], []
    rec = bundle_recipe(bundle_dir)
    for m in manifests:
        cohort = load_external(m, ExternalOptions(), rec, bundle.info["tasks"][0]["outcome"])
        table, _ = patient_table(cohort, score_cohort(bundle, cohort)[:, 0], "first", "mean")
        ys.append(table["y"].to_numpy())
        ss.append(table["score"].to_numpy())
    return np.concatenate(ys), np.concatenate(ss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bins", type=int, default=100)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from stagewise.bundle import export_bundle
    from stagewise.evaluation.binned import binned_auroc, class_histograms, score_edges
    from stagewise.external import evaluate_across_sites
    from stagewise.recipe import recipe_from_dict
    from stagewise.study import SilentReporter, run_study

    work = args.out or Path(tempfile.mkdtemp(prefix="bench-fedeval-"))
    work.mkdir(parents=True, exist_ok=True)
    table, _ = build_manifest(default_data())
    table.to_csv(work / "all.csv", index=False)
    sites = {}
    for site, part in table.groupby("site"):
        sites[site] = work / f"{site}.csv"
        part.to_csv(sites[site], index=False)
    t0 = time.perf_counter()
    run_study(recipe_from_dict(recipe(work / "all.csv", args.size)), work / "run", reporter=SilentReporter())
    bundle = export_bundle(work / "run", "pooled", work / "bundle", fold="r0-f0")
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate_across_sites(bundle, sites, work / "federated", bins=args.bins, bootstrap=2000)
    t_fed = time.perf_counter() - t0
    y, s = central_scores(bundle, list(sites.values()))
    exact = roc_auc_score(y, s)
    pooled = res["pooled"]
    a = pooled["auroc_binned"]
    uniform = binned_auroc(class_histograms(y, s, score_edges(args.bins)))
    print(f"bundle: covid-multisite pooled arm, {args.size} px, probe 3 + thaw 3 epochs, fold r0-f0 of 2 "
          f"(trained in {t_train:.0f} s)")
    print(f"{'site':18s} {'patients':>8s} {'pos':>4s} {'AUROC at site [DeLong 95% CI]':>30s} {'sens':>6s} {'spec':>6s}")
    for name, site in res["sites"].items():
        f = site["figures"]
        print(f"{name:18s} {f['n_patients']:8d} {f['n_positive']:4d} {f['auroc']:12.3f} [{f['auroc_low']:.3f}, "
              f"{f['auroc_high']:.3f}] {f['sensitivity']:6.3f} {f['specificity']:6.3f}")
    print(f"pooled: {pooled['n_patients']} patients, {pooled['n_positive']} positive")
    print(f"  AUROC on pooled patient scores (sklearn, central): {exact:.4f}")
    print(f"  AUROC from summed histograms (federated): {a['point']:.4f}, bound [{a['lower']:.4f}, {a['upper']:.4f}] "
          f"(half-width {a['half_width']:.4f}; {res['settings']['bins']} bins: {args.bins} equal-width + development "
          f"quantiles); |difference| {abs(a['point'] - exact):.4f}; inside the bound: "
          f"{a['lower'] <= exact <= a['upper']}")
    print(f"  the same with {args.bins} equal-width bins only: {uniform['point']:.4f}, bound [{uniform['lower']:.4f}, "
          f"{uniform['upper']:.4f}] (half-width {uniform['half_width']:.4f})")
    t = pooled["at_threshold"]
    print(f"  at the bundle's threshold: sensitivity {t['sensitivity']['point']:.3f}, specificity "
          f"{t['specificity']['point']:.3f} (TP {t['tp']} FP {t['fp']} TN {t['tn']} FN {t['fn']}); mean predicted "
          f"{pooled['calibration_in_the_large']['mean_predicted']:.3f} vs observed "
          f"{pooled['calibration_in_the_large']['observed_rate']:.3f}")
    print(f"federated evaluation wall time (Flower simulation, 3 sites, 2000 bootstrap resamples each): {t_fed:.0f} s")
    print(f"machine: {cpu_model()}; load average {loadavg()}")


if __name__ == "__main__":
    main()
