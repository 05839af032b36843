"""The Ray executor against the local one (prints figures, writes nothing into the repository).

    python examples/prepare_covid_outcome.py          # the manifest (runs/cohorts/covid-outcome.csv)
    python benchmarks/bench_executor.py               # both parts below
    python benchmarks/bench_executor.py --quick       # a smoke run of both parts, small settings

1. Overhead per fit: a small study (scanned digits, 32 px, scratch:tinycnn, 10 fits of a
   fraction of a second each) run locally with 1 torch thread, then through a Ray instance on
   this machine with room for ONE task at a time (num_cpus = cpus_per_task = 1), so that the
   difference is the executor's own cost, not parallelism: Ray's start, the first study
   (worker processes started, torch imported in each), and a second study on the same Ray
   connection (workers reused); the local process also runs two studies, and overhead per fit
   = (Ray wall - local wall) / fits, first against first and second against second.
2. Throughput on a real cohort: covid-outcome (271 chest radiographs, 122 patients), 64 px,
   scratch:resnet18 fine-tuned, 5 folds x 2 repeats = 10 fits: one process with 2 torch
   threads (the local default here) against 2 Ray tasks x 1 thread on the same 2 cores, and
   a local run with 1 thread, whose numbers the Ray run must match bit for bit.

Each configuration runs in its own subprocess, one after another; the load average (1 min)
is printed before and after each, since the machine is shared. Run directories go to a
temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import loadavg  # noqa: E402 - the machine description every benchmark prints
from stagewise.training.autotune import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COVID = REPO / "runs" / "cohorts" / "covid-outcome.csv"


# -- child: one configuration ---------------------------------------------------------------


def _recipe(cfg: dict):
    from stagewise.recipe import recipe_from_dict

    compute = {"threads": cfg["threads"], "executor": cfg["executor"]}
    if cfg["executor"] == "ray":
        compute["cpus_per_task"] = cfg["cpus_per_task"]
    if cfg.get("fp32"):
        compute |= {"device": "cpu", "precision": "fp32", "channels_last": False}
    cohort = {"manifest": cfg["manifest"]}
    if cfg.get("covid"):
        cohort |= {"outcome": "went_icu", "patient": "patient", "positive": ["Y"], "negative": ["N"]}
    return recipe_from_dict({
        "name": "bench-executor", "seed": 0, "cohort": cohort,
        "data": {"image_size": cfg["size"]},
        "protocol": {"folds": 5, "repeats": cfg["repeats"]},
        "compute": compute,
        "evaluation": {"saliency": 0, "bootstrap": 0, "report": False},
        "arms": [{"name": "net", "backbone": cfg["backbone"], "stages": cfg["stages"]}],
    })


def child(cfg: dict) -> dict:
    import torch

    from stagewise.study import run_study

    out = {"torch_threads_driver": torch.get_num_threads()}
    recipe = _recipe(cfg)
    if cfg["executor"] == "ray":
        import logging

        import ray

        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=cfg["ray_cpus"], include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
        out["ray_init_s"] = time.perf_counter() - t0
        out["ray"] = ray.__version__
    for label in cfg["runs"]:
        run_dir = Path(cfg["tmp"]) / f"{cfg['name']}-{label}"
        t0 = time.perf_counter()
        result = run_study(recipe, run_dir)
        wall = time.perf_counter() - t0
        metas = [json.loads(p.read_text()) for p in sorted((run_dir / "folds").glob("*/*.json"))]
        probs = result.predictions["prob"].to_numpy()
        out[label] = {
            "wall_s": wall,
            "fits": len(metas),
            "fit_seconds_sum": sum(m["seconds"] for m in metas),
            "auroc_mean": result.metrics["arms"]["net"]["summary"]["auroc"]["mean"],
            "predictions_sha": hashlib.sha256(probs.tobytes()).hexdigest()[:16],
            "nodes": sorted({m["executor"]["node"] for m in metas if "executor" in m}),
            "worker_pids": len({m["executor"]["pid"] for m in metas if "executor" in m}),
            "compute": result.metrics["compute"],
        }
    return out


# -- parent -----------------------------------------------------------------------------------


def run_child(cfg: dict) -> dict:
    before = loadavg()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{cfg['name']} failed:\n{done.stderr[-4000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    res["load_before"], res["load_after"] = before, loadavg()
    return res


def _line(name: str, r: dict, label: str) -> str:
    x = r[label]
    return (f"  {name:<34} wall {x['wall_s']:7.2f} s   fits {x['fits']:2d}   sum of fit seconds {x['fit_seconds_sum']:7.2f}"
            f"   AUROC {x['auroc_mean']:.4f}   predictions {x['predictions_sha']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--manifest", default=str(COVID))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import ray
    import torch

    print("stagewise executor benchmark")
    print(f"command: python benchmarks/bench_executor.py{' --quick' if args.quick else ''}")
    print(f"date: {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}")
    print(f"cpu: {cpu_model()}; {os.cpu_count()} logical CPUs; torch {torch.__version__}, ray {ray.__version__}, "
          f"python {platform.python_version()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    try:
        from stagewise.study.demo import make_demo_cohort

        digits = make_demo_cohort(tmp / "digits", per_class=40)
        small = {"manifest": str(digits), "size": 32, "repeats": 2, "backbone": "scratch:tinycnn", "fp32": True,
                 "stages": [{"kind": "probe", "epochs": 2, "batch_size": 16, "lr": 3e-3}], "tmp": str(tmp)}
        print("\n== 1. overhead per fit: digits 80 images (40 patients), 32 px, scratch:tinycnn, probe 2 epochs, "
              "5 folds x 2 repeats = 10 fits, fp32 ==")
        local = run_child(small | {"name": "small-local", "executor": "local", "threads": 1, "runs": ["cold", "warm"]})
        print(_line("local 1 thread, 1st study", local, "cold"))
        print(_line("local 1 thread, 2nd study", local, "warm") + f"   load {local['load_before']} -> {local['load_after']}")
        rayr = run_child(small | {"name": "small-ray", "executor": "ray", "threads": 1, "cpus_per_task": 1,
                                  "ray_cpus": 1, "runs": ["cold", "warm"]})
        print(f"  ray.init (new local instance, num_cpus=1): {rayr['ray_init_s']:.2f} s")
        print(_line("ray 1 task at a time, 1st study", rayr, "cold"))
        print(_line("ray 1 task at a time, 2nd study", rayr, "warm") + f"   load {rayr['load_before']} -> {rayr['load_after']}")
        n = local["cold"]["fits"]
        for label, what in (("cold", "1st study in the process (Ray: workers start)"),
                            ("warm", "2nd study in the process (Ray: workers reused)")):
            extra = rayr[label]["wall_s"] - local[label]["wall_s"]
            print(f"  overhead per fit, {what}: {extra / n:.3f} s  ({extra:+.2f} s over {n} fits); "
                  f"same predictions as local: {rayr[label]['predictions_sha'] == local[label]['predictions_sha']}")

        manifest = Path(args.manifest)
        if not manifest.is_file():
            subprocess.run([sys.executable, str(REPO / "examples" / "prepare_covid_outcome.py")], check=True)
        epochs = 1 if args.quick else 4
        real = {"manifest": str(manifest), "covid": True, "size": 64, "repeats": 1 if args.quick else 2,
                "backbone": "scratch:resnet18",
                "stages": [{"kind": "finetune", "epochs": epochs, "batch_size": 16, "lr": 1e-3}], "tmp": str(tmp)}
        print(f"\n== 2. throughput: covid-outcome {manifest.name}, 64 px, scratch:resnet18 finetune {epochs} epochs, "
              f"batch 16, 5 folds x {real['repeats']} = {5 * real['repeats']} fits, precision auto ==")
        a = run_child(real | {"name": "real-local2", "executor": "local", "threads": 2, "runs": ["run"]})
        print(_line("local, 1 process x 2 threads", a, "run") + f"   load {a['load_before']} -> {a['load_after']}")
        b = run_child(real | {"name": "real-ray", "executor": "ray", "threads": 1, "cpus_per_task": 1, "ray_cpus": 2,
                              "runs": ["run"]})
        print(_line("ray, 2 tasks x 1 thread", b, "run") + f"   load {b['load_before']} -> {b['load_after']}")
        print(f"    (ray.init {b['ray_init_s']:.2f} s ran before and is not in the wall; starting the worker processes "
              f"is; {b['run']['worker_pids']} worker processes on {b['run']['nodes']})")
        c = run_child(real | {"name": "real-local1", "executor": "local", "threads": 1, "runs": ["run"]})
        print(_line("local, 1 process x 1 thread", c, "run") + f"   load {c['load_before']} -> {c['load_after']}")
        fits = a["run"]["fits"]
        for name, r in (("local 1x2", a), ("ray 2x1", b), ("local 1x1", c)):
            print(f"  {name}: {60 * fits / r['run']['wall_s']:.1f} fits/min; mean seconds per fit inside the fit "
                  f"{r['run']['fit_seconds_sum'] / fits:.2f}")
        print(f"  ray 2x1 vs local 1x2: {a['run']['wall_s'] / b['run']['wall_s']:.2f}x throughput; "
              f"predictions identical to local 1 thread: {b['run']['predictions_sha'] == c['run']['predictions_sha']}; "
              f"to local 2 threads: {b['run']['predictions_sha'] == a['run']['predictions_sha']}")
        print("\nGPU: not measured (no GPU on this machine); open.")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
