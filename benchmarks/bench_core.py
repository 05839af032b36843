"""Core training-speed benchmark of stagewise on a real cohort (prints figures, writes nothing
into the repository).

    python examples/prepare_covid_outcome.py          # the manifest (runs/cohorts/covid-outcome.csv)
    python benchmarks/bench_core.py --quick           # smoke run of every mode, seconds
    python benchmarks/bench_core.py                   # seconds per epoch, reuse ON vs OFF, peak RSS
    python benchmarks/bench_core.py --study           # wall time of one 5-fold probe+thaw study
    python benchmarks/bench_core.py --floor           # AUROC of scratch:resnet18 trained from scratch

Modes (several flags run in sequence, never in parallel):

  --epochs (default when no mode is named): on fold 1 of a 5-fold split of the covid-outcome
    manifest, a ResNet-50 (`scratch:resnet50`: random weights, since nothing can be downloaded
    here; the speed does not depend on the weight values) is trained through each arm's stages
    with stagewise's own `fit_stage` (stage by stage, as run_study does), once with `compute.reuse_frozen` ON and once OFF. Each
    (arm, reuse) pair runs in its own subprocess, so the peak RSS (ru_maxrss) is that arm's.
    Arms: probe (stagewise default `bn: freeze`, so its frozen trunk can be cached), probe+thaw
    (the BPD paper's stages: `bn: adapt` and CutMix; epochs cut for timing), full fine-tune.
  --study: `run_study` on a 5-fold x 1 probe+thaw recipe with the paper's stages. If the paper's
    epochs (10 probe + 20 thaw) would take longer than --budget-min (default 25 min, estimated
    from a short calibration on the same machine), the thaw stage gets fewer epochs and the
    printout says so.
  --floor: `run_study` with `scratch:resnet18` fine-tuned from random weights, 5 folds: the
    AUROC (mean +- sd over folds) that a pretrained arm must beat.

All training goes through stagewise's API (recipe_from_dict, load_cohort, make_splits,
load_image_set, create_backbone, fit_stage, run_study); run directories go to a temporary
folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = REPO / "runs" / "cohorts" / "covid-outcome.csv"

# --- the stages (BPD paper values, METHODS.md; epochs are overridden per mode) -------------

PROBE = dict(kind="probe", epochs=10, batch_size=8, lr=1e-3, weight_decay=1e-4,
             bn="freeze", balanced_sampling=True)
"""stagewise's default probe: BatchNorm frozen, so the frozen trunk's output is cacheable."""
PAPER_PROBE = dict(PROBE, bn="adapt")
"""The paper's probe: model in train mode, BatchNorm statistics adapt (no caching possible)."""
PAPER_THAW = dict(kind="thaw", epochs=20, batch_size=8, schedule="onecycle", pct_start=0.3,
                  unfreeze={"layer4": 0.1, "layer3": 0.3, "layer2": 0.6},
                  lr={"head": 1e-3, "layer4": 5e-4, "layer3": 2.5e-4, "layer2": 1e-4},
                  weight_decay=1e-4, cutmix={"alpha": 1.0, "p": 0.5}, bn="adapt",
                  balanced_sampling=True)
FINETUNE = dict(kind="finetune", epochs=3, batch_size=8, lr=1e-4, weight_decay=1e-4,
                schedule="onecycle", bn="adapt", balanced_sampling=True)
FLOOR_FINETUNE = dict(kind="finetune", epochs=20, batch_size=16, lr=1e-3, weight_decay=1e-4,
                      schedule="onecycle", bn="adapt", balanced_sampling=True,
                      augment={"rotate": 10, "translate": 0.05, "scale": 0.1, "intensity": 0.1})


def _with(stage: dict, **kw) -> dict:
    out = copy.deepcopy(stage)
    out.update(kw)
    return out


# --- machine --------------------------------------------------------------------------------



def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_busy() -> float:
    """CPU-seconds spent by every process of this machine (VM) so far, from /proc/stat."""
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_idle(max_wait: float, quiet_s: int = 3, threshold: float = 0.15) -> str:
    """Wait until the machine has been idle (< `threshold` busy CPUs) for `quiet_s` seconds,
    at most `max_wait` seconds: other jobs on a 2-core machine distort timings badly."""
    if max_wait <= 0:
        return "no wait"
    t0, quiet = time.perf_counter(), 0
    while time.perf_counter() - t0 < max_wait:
        b0 = machine_busy()
        time.sleep(1.0)
        quiet = quiet + 1 if machine_busy() - b0 < threshold else 0
        if quiet >= quiet_s:
            return f"idle after {time.perf_counter() - t0:.0f} s"
    return f"NOT idle after {max_wait:.0f} s, started anyway"


def machine_lines(precision: str) -> list[str]:
    import torch

    from stagewise.recipe import ComputeConfig
    from stagewise.training.autotune import cpu_model
    from stagewise.training.compute import resolve_compute

    compute = resolve_compute(ComputeConfig(precision=precision))
    flags = ""
    try:
        f = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")).split()
        flags = ", ".join(x for x in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if x in f)
    except (OSError, StopIteration):
        pass
    return [
        f"date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu: {cpu_model()} ({flags or 'no avx512/amx flags'}); {os.cpu_count()} logical CPUs; "
        f"torch threads: {torch.get_num_threads()}",
        f"torch {torch.__version__}, python {platform.python_version()}; precision: {compute.label}",
        f"load average at start: {loadavg()}",
    ]


# --- cohort ---------------------------------------------------------------------------------

def subset_manifest(manifest: Path, out: Path, n_images: int, min_per_class: int = 6) -> Path:
    """Whole patients, alternating between outcomes, until the subset holds at least
    `n_images` images and `min_per_class` patients of each outcome (enough for 5 folds)."""
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    first = df.groupby("patient", sort=False)["went_icu"].first()
    queues = [list(first[first == "Y"].index), list(first[first == "N"].index)]
    size = df.groupby("patient").size()
    keep, count, per_class = [], 0, [0, 0]
    while (count < n_images or min(per_class) < min_per_class) and any(queues):
        for c, q in enumerate(queues):
            if q:
                pid = q.pop(0)
                keep.append(pid)
                count += int(size[pid])
                per_class[c] += 1
    df[df["patient"].isin(set(keep))].to_csv(out, index=False)
    return out


def base_recipe(manifest: Path, arch: str, size: int, stages: list[dict], reuse: bool, precision: str,
                name: str = "bench", folds: int = 5, repeats: int = 1) -> dict:
    return {
        "name": name,
        "seed": 0,
        "cohort": {"manifest": str(manifest), "image": "path", "outcome": "went_icu", "patient": "patient",
                   "positive": ["Y"], "negative": ["N"]},
        "data": {"image_size": size, "resize": "pad"},
        # test_images: first, as in examples/covid-outcome.yaml (manifest ordered by offset).
        "protocol": {"folds": folds, "repeats": repeats, "test_images": "first"},
        "compute": {"precision": precision, "reuse_frozen": reuse},
        "arms": [{"name": name, "backbone": arch, "head": {"dropout": 0.1}, "stages": stages}],
    }


# --- worker: one arm, one reuse setting, one fold, in its own process ------------------------

def _usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"maxrss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime}


def worker(spec: dict) -> dict:
    import torch

    from stagewise.data import load_cohort
    from stagewise.evaluation.splits import make_splits
    from stagewise.models import Network, create_backbone
    from stagewise.recipe import recipe_from_dict
    from stagewise.evaluation.splits import fold_seed
    from stagewise.training.cache import load_image_set
    from stagewise.training.cache import PrefixCache
    from stagewise.training.compute import resolve_compute
    from stagewise.training.engine import fit_stage, prepare_network

    after_import = _usage()
    recipe = recipe_from_dict(spec["recipe"], source="bench")
    compute = resolve_compute(recipe.compute)
    cohort = load_cohort(recipe.cohort)
    t = cohort.table
    split = make_splits(t["y"].to_numpy(), t["patient"].to_numpy(), recipe.protocol, recipe.seed)[0]
    targets = torch.tensor(t["y"].to_numpy(), dtype=torch.float32).unsqueeze(1)
    t0 = time.perf_counter()
    images = load_image_set(recipe, cohort)
    t_images = time.perf_counter() - t0
    arm = recipe.arms[0]
    seed = fold_seed(recipe.seed, split)
    torch.manual_seed(seed)
    net = prepare_network(Network.build(create_backbone(**arm.backbone.model_dump()), 1, 0, arm.head.dropout, arm.head.hidden), compute)
    cache = PrefixCache() if compute.reuse_frozen else None  # as run_study does
    ready = _usage()
    load0 = loadavg()
    t0, c0, busy0 = time.perf_counter(), ready["cpu_s"], machine_busy()
    stages = []
    for i, stage in enumerate(arm.stages):  # the stages of one fold, as run_study trains them
        log = fit_stage(net, stage, images, split.train, targets, compute, cache, seed + 1000 * (i + 1))
        stages.append({
            "kind": stage.kind,
            "epochs": [{"seconds": e["seconds"], "trainable": e["trainable"],
                        "resumed_after_groups": e["resumed_after_groups"]} for e in log.epochs],
        })
    wall = time.perf_counter() - t0
    end = _usage()
    others = machine_busy() - busy0 - (end["cpu_s"] - c0)
    return {
        "compute": compute.label,
        "threads": torch.get_num_threads(),
        "n_train": int(len(split.train)),
        "n_images": int(len(t)),
        "image_load_s": t_images,
        "train_wall_s": wall,
        "cpu_per_wall": (end["cpu_s"] - c0) / wall if wall > 0 else float("nan"),
        "others_cpu_per_wall": others / wall if wall > 0 else float("nan"),
        "rss_after_import_mib": after_import["maxrss_mib"],
        "rss_ready_mib": ready["maxrss_mib"],
        "peak_rss_mib": end["maxrss_mib"],
        "cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses},
        "load_before": load0,
        "load_after": loadavg(),
        "stages": stages,
    }


def run_worker(spec: dict, max_wait: float = 0.0) -> dict:
    spec = dict(spec, waited=wait_idle(max_wait))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"worker failed (exit {proc.returncode}) for {spec['label']}")
    out = json.loads(lines[-1][len("RESULT "):])
    out["waited"] = spec["waited"]
    return out


# --- mode: seconds per epoch ----------------------------------------------------------------

def _phase(e: dict) -> str:
    groups = [g for g in e["trainable"] if g != "head"]
    return "head" if not groups else "head+" + "+".join(sorted(groups, reverse=True))


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def mode_epochs(args, manifest: Path) -> None:
    P, T, F = args.probe_epochs, args.thaw_epochs, args.finetune_epochs
    arms = {
        "probe": [_with(PROBE, epochs=P)],
        "probe+thaw": [_with(PAPER_PROBE, epochs=args.pt_probe_epochs), _with(PAPER_THAW, epochs=T)],
        "finetune": [_with(FINETUNE, epochs=F)],
    }
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms}
    print(f"\n== seconds per epoch: {args.arch}, {args.size} px, batch 8, fold 1 of 5 (1 repeat), "
          f"reuse_frozen ON vs OFF ==")
    print(f"arms: probe = probe {P} ep (bn freeze, stagewise default); "
          f"probe+thaw = paper's stages (bn adapt, CutMix in thaw), probe {args.pt_probe_epochs} ep + thaw {T} ep "
          f"(paper: 10 + 20; unfreeze fractions 0.1/0.3/0.6 kept); finetune = all groups {F} ep")
    results = {}
    for name, stages in arms.items():
        for reuse in (True, False):
            label = f"{name} reuse={'ON' if reuse else 'OFF'}"
            spec = {"label": label, "recipe": base_recipe(manifest, args.arch, args.size, stages, reuse, args.precision)}
            r = run_worker(spec, args.wait_idle)
            results[(name, reuse)] = r
            print(f"\n[{label}] {r['compute']}, {r['threads']} threads, {r['n_train']} training images "
                  f"(of {r['n_images']}); images loaded in {r['image_load_s']:.1f} s")
            for s in r["stages"]:
                secs = [e["seconds"] for e in s["epochs"]]
                per_epoch = " ".join(
                    f"{e['seconds']:.2f}{'*' if e['resumed_after_groups'] else ''}" for e in s["epochs"])
                print(f"  {s['kind']:<8} median {_fmt(statistics.median(secs))} s/epoch over {len(secs)} epochs; "
                      f"epochs: {per_epoch}")
                phases: dict[str, list[float]] = {}
                for e in s["epochs"]:
                    phases.setdefault(_phase(e), []).append(e["seconds"])
                if len(phases) > 1:
                    print("           by trainable groups: " + "; ".join(
                        f"{p} median {_fmt(statistics.median(v))} s (n={len(v)})" for p, v in phases.items()))
                resumed = sorted({e["resumed_after_groups"] for e in s["epochs"]})
                print(f"           resumed after groups (0 = full forward from pixels): {resumed}")
            print(f"  train wall {r['train_wall_s']:.1f} s, cpu/wall {r['cpu_per_wall']:.2f} "
                  f"(other processes {r['others_cpu_per_wall']:.2f} CPUs; {r['waited']}), "
                  f"peak RSS {r['peak_rss_mib']:.0f} MiB (after import {r['rss_after_import_mib']:.0f}, "
                  f"with images + backbone {r['rss_ready_mib']:.0f}); cache {r['cache']}; "
                  f"load {r['load_before']} -> {r['load_after']}")
    print("\n(* = epoch resumed from a cached frozen prefix; the first reuse epoch includes filling the cache "
          "for all images of the cohort.)")
    print("\nsummary: median s/epoch per stage, reuse ON / OFF (ratio OFF/ON); peak RSS ON / OFF")
    for name in arms:
        on, off = results.get((name, True)), results.get((name, False))
        cells = []
        for s_on, s_off in zip(on["stages"], off["stages"]):
            m_on = statistics.median(e["seconds"] for e in s_on["epochs"])
            m_off = statistics.median(e["seconds"] for e in s_off["epochs"])
            cells.append(f"{s_on['kind']} {_fmt(m_on)} / {_fmt(m_off)} s ({m_off / m_on:.1f}x)")
        print(f"  {name:<11} " + "; ".join(cells) +
              f"; peak RSS {on['peak_rss_mib']:.0f} / {off['peak_rss_mib']:.0f} MiB")


# --- mode: a whole study --------------------------------------------------------------------

def _calibrate(args, manifest: Path, n_cal: int) -> dict:
    """Per-image seconds of the paper's probe and of each thaw phase, from a short worker run
    on `n_cal` training images (a 5-epoch thaw visits layer4, layer3 and layer2 phases)."""
    tmp = Path(tempfile.mkdtemp(prefix="stagewise-cal-"))
    try:
        # Whole patients, so that the training part of fold 1 holds about n_cal images.
        cal = subset_manifest(manifest, tmp / "cal.csv", int(n_cal * 1.25))
        stages = [_with(PAPER_PROBE, epochs=2), _with(PAPER_THAW, epochs=5)]
        spec = {"label": "calibration", "recipe": base_recipe(cal, args.arch, args.size, stages, True, args.precision)}
        r = run_worker(spec, args.wait_idle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = r["n_train"]
    probe = r["stages"][0]["epochs"]
    thaw = r["stages"][1]["epochs"]
    per = {"head": min(e["seconds"] for e in probe) / n}  # train-mode forward, head step
    for e in thaw:
        p = _phase(e)
        per[p] = min(per.get(p, float("inf")), e["seconds"] / n)
    return {"per_image": per, "n_cal": n}


def _estimate(per: dict, n_train: float, n_eval: float, probe_epochs: int, thaw_epochs: int, folds: int) -> float:
    start = {g: int(round(f * thaw_epochs)) for g, f in PAPER_THAW["unfreeze"].items()}
    order = ["layer4", "layer3", "layer2"]
    thaw = 0.0
    for e in range(thaw_epochs):
        groups = [g for g in order if start[g] <= e]
        p = "head" if not groups else "head+" + "+".join(sorted(groups, reverse=True))
        thaw += per.get(p, max(per.values())) * n_train
    probe = probe_epochs * per["head"] * n_train
    evaluation = per["head"] * n_eval
    return folds * (probe + thaw + evaluation)


def _summary_line(arm: dict) -> str:
    s = arm["summary"]
    return ", ".join(f"{k} {s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in ("auroc", "balanced_accuracy", "f1"))


def _run_study(recipe_dict: dict, max_wait: float):
    from stagewise.recipe import recipe_from_dict
    from stagewise.study import run_study

    recipe = recipe_from_dict(recipe_dict, source="bench")
    out = Path(tempfile.mkdtemp(prefix="stagewise-bench-run-"))
    waited = wait_idle(max_wait)
    try:
        t0, c0, b0 = time.perf_counter(), _usage()["cpu_s"], machine_busy()
        result = run_study(recipe, out / "run")
        wall = time.perf_counter() - t0
        cpu = _usage()["cpu_s"] - c0
        others = machine_busy() - b0 - cpu
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result, wall, cpu, f"other processes {others / wall:.2f} CPUs; {waited}"


def mode_study(args, manifest: Path) -> None:
    import pandas as pd

    folds = 5
    n_images = len(pd.read_csv(manifest))
    n_train = n_images * (folds - 1) / folds
    n_eval = n_images  # evaluation predicts the training part and the test images
    probe_epochs, thaw_epochs = args.study_probe_epochs, args.study_thaw_epochs
    print(f"\n== one whole study: probe+thaw (paper's stages), {args.arch}, {args.size} px, {folds} folds x 1 ==")
    note = ""
    if thaw_epochs is None:
        cal = _calibrate(args, manifest, args.calibration_images)
        per = cal["per_image"]
        print(f"calibration ({cal['n_cal']} training images; s per image-epoch): "
              + ", ".join(f"{k} {v:.4f}" for k, v in per.items()))
        full = _estimate(per, n_train, n_eval, 10, 20, folds)
        print(f"estimated wall time with the paper's epochs (10 probe + 20 thaw): {full / 60:.1f} min "
              f"(budget {args.budget_min:g} min)")
        thaw_epochs = 20
        if full > args.budget_min * 60:
            while thaw_epochs > 1 and _estimate(per, n_train, n_eval, probe_epochs, thaw_epochs, folds) > args.budget_min * 60:
                thaw_epochs -= 1
            note = (f"NOTE: the paper's 20 thaw epochs would exceed the budget; this run uses {thaw_epochs} thaw "
                    f"epochs (estimate {_estimate(per, n_train, n_eval, probe_epochs, thaw_epochs, folds) / 60:.1f} min).")
    else:
        if (probe_epochs, thaw_epochs) != (10, 20):
            note = f"NOTE: epochs set on the command line: {probe_epochs} probe + {thaw_epochs} thaw (paper: 10 + 20)."
    if note:
        print(note)
    stages = [_with(PAPER_PROBE, epochs=probe_epochs), _with(PAPER_THAW, epochs=thaw_epochs)]
    recipe = base_recipe(manifest, args.arch, args.size, stages, True, args.precision, name="probe+thaw", folds=folds)
    result, wall, cpu, others = _run_study(recipe, args.wait_idle)
    arm = result.metrics["arms"]["probe+thaw"]
    print(f"study: {probe_epochs} probe + {thaw_epochs} thaw epochs, {result.metrics['n_splits']} folds, "
          f"{result.metrics['compute']}: wall {wall:.1f} s ({wall / 60:.1f} min), cpu/wall {cpu / wall:.2f} "
          f"({others}), "
          f"training {arm['train_seconds']:.1f} s")
    print(f"  fold metrics (random-init weights, so not a result): {_summary_line(arm)}")
    print(f"  peak RSS of this process so far: {_usage()['maxrss_mib']:.0f} MiB; load {loadavg()}")


# --- mode: the from-scratch floor -----------------------------------------------------------

def mode_floor(args, manifest: Path) -> None:
    stages = [_with(FLOOR_FINETUNE, epochs=args.floor_epochs)]
    recipe = base_recipe(manifest, "scratch:resnet18", args.floor_size, stages, True, args.precision,
                         name="scratch-floor", folds=5)
    print(f"\n== floor: scratch:resnet18 fine-tuned from random weights, {args.floor_size} px, "
          f"{args.floor_epochs} epochs (onecycle lr 1e-3, batch 16, light augmentation), 5 folds x 1, "
          f"test on each patient's first image ==")
    result, wall, cpu, others = _run_study(recipe, args.wait_idle)
    arm = result.metrics["arms"]["scratch-floor"]
    aurocs = " ".join(f"{f['auroc']:.3f}" for f in arm["folds"])
    print(f"  {_summary_line(arm)}")
    print(f"  fold AUROCs: {aurocs}; wall {wall:.1f} s, cpu/wall {cpu / wall:.2f} ({others}), {result.metrics['compute']}")


# --- main -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", action="store_true", help="seconds per epoch, reuse ON vs OFF, peak RSS (default mode)")
    ap.add_argument("--study", action="store_true", help="wall time of one 5-fold probe+thaw study")
    ap.add_argument("--floor", action="store_true", help="AUROC of scratch:resnet18 from random weights, 5 folds")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: about 20 images, 64 px, 1 epoch per stage")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, help="cohort manifest (examples/prepare_covid_outcome.py)")
    ap.add_argument("--arch", default="scratch:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--arms", nargs="*", choices=["probe", "probe+thaw", "finetune"], help="subset of arms (--epochs)")
    ap.add_argument("--probe-epochs", type=int, default=10, help="probe arm (--epochs)")
    ap.add_argument("--pt-probe-epochs", type=int, default=3, help="probe stage of probe+thaw (--epochs; paper 10)")
    ap.add_argument("--thaw-epochs", type=int, default=10, help="thaw stage of probe+thaw (--epochs; paper 20)")
    ap.add_argument("--finetune-epochs", type=int, default=3, help="finetune arm (--epochs)")
    ap.add_argument("--study-probe-epochs", type=int, default=10)
    ap.add_argument("--study-thaw-epochs", type=int, default=None, help="default: 20 (paper) unless over --budget-min")
    ap.add_argument("--budget-min", type=float, default=25.0, help="--study: longest acceptable wall time")
    ap.add_argument("--calibration-images", type=int, default=24)
    ap.add_argument("--floor-size", type=int, default=128)
    ap.add_argument("--floor-epochs", type=int, default=20)
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="before each measurement, wait up to this many seconds for the machine to be idle (0: never)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    if not args.manifest.is_file():
        raise SystemExit(f"{args.manifest} not found: run `python examples/prepare_covid_outcome.py` first")
    modes = [m for m in ("epochs", "study", "floor") if getattr(args, m)] or ["epochs"]
    tmp = None
    manifest = args.manifest.resolve()
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="stagewise-quick-"))
        manifest = subset_manifest(manifest, tmp / "quick.csv", 20)
        args.size, args.floor_size = 64, 64
        args.probe_epochs = args.pt_probe_epochs = args.thaw_epochs = args.finetune_epochs = 1
        args.study_probe_epochs, args.floor_epochs = 1, 1
        args.calibration_images, args.budget_min = 8, 0.001  # exercise the epoch cut
        args.wait_idle = 0.0
    print("stagewise core benchmark" + (" (QUICK smoke run: figures are meaningless)" if args.quick else ""))
    print(f"command: python benchmarks/bench_core.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    for line in machine_lines(args.precision):
        print(line)
    import pandas as pd

    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    print(f"cohort: {manifest.name}: {len(df)} images, {df['patient'].nunique()} patients, "
          f"went_icu Y {int((df['went_icu'] == 'Y').sum())} / N {int((df['went_icu'] == 'N').sum())} images")
    try:
        for m in modes:
            t0 = time.perf_counter()
            {"epochs": mode_epochs, "study": mode_study, "floor": mode_floor}[m](args, manifest)
            print(f"[{m} mode: {time.perf_counter() - t0:.1f} s wall; load average {loadavg()}]")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
