"""External validation on real data: a bundle trained on one COVID-era chest X-ray collection,
evaluated with `stagewise evaluate` on the other.

    nice -n 10 python benchmarks/bench_external.py [--size 64] [--bootstrap 2000] [--out DIR]

Development: the ieee8023 collection (examples/prepare_covid_outcome.py: frontal views, known
`went_icu`, "ICU/CCU at any time"), WITHOUT its 82 rows that are Hannover images
(`also_in_hannover_repo`, column `hannover` of the manifest): no image and no patient is on
both sides. External: the Hannover Medical School repository (../shared/data/covid-cxr-outcome/
hannover, labels_derived.csv), outcome `icu_ever` (Y/N: an ICU admission at any time), its own
column names and coding mapped by options; rows ordered by patient and admission_offset
descending (largest first = the image closest to admission), so `test_images: first` scores
each patient's earliest image, as in development.

One study (examples/covid-outcome.yaml's probe -> thaw arm on a random-init ResNet-18 at 64 px,
5 folds x 1 repeat, short schedules: nothing can be downloaded here, so the figures are a
floor), refit on every development image and exported; then `stagewise evaluate` with an
intercept recalibration fitted on half of the Hannover patients and evaluated on the other half.
Prints the figures, the command, the machine and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "examples"))

from bench_core import loadavg  # noqa: E402
from stagewise.training.autotune import cpu_model  # noqa: E402
from prepare_covid_outcome import build_manifest, default_data, without_hannover  # noqa: E402


def development_manifest(data: Path, out: Path) -> tuple[Path, int]:
    table, overlap = without_hannover(build_manifest(data)[0])
    table.to_csv(out, index=False)
    return out, overlap


def hannover_manifest(data: Path, out: Path) -> Path:
    folder = data / "covid-cxr-outcome" / "hannover"
    t = pd.read_csv(folder / "labels_derived.csv", dtype=str, keep_default_na=False)
    t["file"] = [str((folder / p).resolve()) for p in t["png_file"]]
    t["offset"] = pd.to_numeric(t["admission_offset"], errors="coerce")
    t = t.sort_values(["patient_id", "offset"], ascending=[True, False], na_position="last", kind="stable")
    t[["file", "patient_id", "icu_ever", "projection", "admission_offset"]].to_csv(out, index=False)
    return out


def recipe_dict(manifest: Path, size: int) -> dict:
    data = yaml.safe_load((REPO / "examples" / "covid-outcome.yaml").read_text())
    data["cohort"] = {k: v for k, v in data["cohort"].items() if k not in ("clinical", "baselines")} | {"manifest": str(manifest)}
    data["data"]["image_size"] = size
    data["protocol"]["repeats"] = 1
    arm = next(a for a in data["arms"] if a["name"] == "probe-thaw")
    arm["stages"][0]["epochs"], arm["stages"][1]["epochs"] = 5, 6
    data["arms"] = [arm]
    data["evaluation"] = {"bootstrap": 500, "saliency": 0, "clinical_model": False, "report": False}
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args(argv)
    from stagewise.bundle.export import export_bundle
    from stagewise.external import ExternalOptions, evaluate_bundle
    from stagewise.recipe import recipe_from_dict
    from stagewise.study import run_study

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), cpu_model())
    print("stagewise external-validation benchmark")
    print(f"command: nice -n 10 python benchmarks/bench_external.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"cpu (lscpu model name): {model}; {os.cpu_count()} logical CPUs; niceness {os.nice(0)}")
    print(f"load average at start: {loadavg()}")
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-external-"))
    work.mkdir(parents=True, exist_ok=True)
    data = default_data().expanduser().resolve()
    dev, overlap = development_manifest(data, work / "ieee8023-without-hannover.csv")
    ext = hannover_manifest(data, work / "hannover.csv")
    dev_t, ext_t = pd.read_csv(dev), pd.read_csv(ext)
    names_dev = {Path(p).stem for p in dev_t["path"]}
    names_ext = {Path(p).stem for p in ext_t["file"]}
    print(f"development: ieee8023, {len(dev_t)} images, {dev_t['patient'].nunique()} patients "
          f"({overlap} Hannover rows dropped); external: Hannover, {len(ext_t)} images, "
          f"{ext_t['patient_id'].nunique()} patients; image ids on both sides: {len(names_dev & names_ext)}")
    recipe = recipe_from_dict(recipe_dict(dev, args.size))
    t0 = time.perf_counter()
    result = run_study(recipe, work / "run")
    t_study = time.perf_counter() - t0
    s = result.metrics["arms"]["probe-thaw"]["summary"]
    print(f"\n== development: 5-fold CV, scratch:resnet18 {args.size} px, probe 5 ep -> thaw 6 ep ({t_study:.0f} s) ==")
    print("  " + ", ".join(f"{m} {s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" for m in ("auroc", "balanced_accuracy", "f1",
                                                                                "sensitivity", "specificity")))
    t0 = time.perf_counter()
    bundle = export_bundle(work / "run", "probe-thaw", work / "bundle", refit=True)
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = ExternalOptions(image="file", outcome="icu_ever", patient="patient_id", positive=["Y"], negative=["N"],
                              recalibrate="intercept", fit_fraction=0.5, bootstrap=args.bootstrap, seed=0)
    res = evaluate_bundle(bundle, ext, work / "evaluation", options)
    t_eval = time.perf_counter() - t0
    c = res["cohort"]
    print(f"\n== external: Hannover, outcome icu_ever (Y), {c['patients']} patients ({c['positive_patients']} positive), "
          f"{c['images_scored']} images scored (first per patient); refit bundle, threshold "
          f"{res['bundle']['threshold']:.4f} ==")
    print(f"  {'metric':24s} {'development (ref.)':>20s} {'external [95 % CI]':>28s} {'delta':>8s}")
    for r in res["comparison"]:
        e = r["external"]
        ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None and e.get("high") is not None else ""
        ref = "-" if r["reference"] is None else f"{r['reference']:.3f} ({r['reference_kind']})"
        ext_s = "-" if e.get("point") is None else f"{e['point']:.3f}{ci}"
        d = "-" if r["difference"] is None else f"{r['difference']:+.3f}"
        print(f"  {r['metric']:24s} {ref:>34s} {ext_s:>26s} {d:>8s}")
    x = res["external"]
    print(f"  mean predicted {x['mean_predicted']:.3f} against observed {x['observed_rate']:.3f}; "
          f"development prevalence (patients) {res['bundle']['development_cohort'].get('prevalence_patients', float('nan')):.3f}")
    rec = res["recalibration"]
    b, a = rec["before"], rec["after"]
    print(f"\n== recalibration (intercept), fitted on {rec['fitted_on']['n_patients']} patients "
          f"({rec['fitted_on']['n_positive']} pos.), evaluated on {rec['held_out']['n_patients']} held out "
          f"({rec['held_out']['n_positive']} pos.): intercept {rec['intercept']:+.3f} ==")
    for name, ev in (("as exported", b), ("recalibrated", a)):
        cal = ev["calibration"]
        print(f"  {name:13s} calibration-in-the-large {cal['intercept']:+.3f} [{cal['intercept_low']:+.3f}, "
              f"{cal['intercept_high']:+.3f}], slope {cal['slope']:.3f}, Brier {cal['brier']:.3f}, "
              f"mean predicted {ev['mean_predicted']:.3f} / observed {ev['observed_rate']:.3f}, "
              f"AUROC {ev['auroc_delong_ci']['point']:.3f}")
    print(f"\ntimes: study {t_study:.0f} s, refit + export {t_export:.0f} s, evaluate {t_eval:.0f} s; "
          f"load average at end: {loadavg()}")
    print(f"output: {work / 'evaluation'} (report.html, external.json); sizes {json.dumps({'bootstrap': args.bootstrap})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
