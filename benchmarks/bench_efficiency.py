"""Efficiency figures: dynamic freezing vs full fine-tuning, tiny CNNs, exported-model latency.

    python benchmarks/bench_efficiency.py --tiny      # MNIST / Fashion-MNIST, <= 15k parameters
    python benchmarks/bench_efficiency.py --memory    # dynamic (SlimFit) vs finetune on covid-cxr-outcome
    python benchmarks/bench_efficiency.py --export    # CPU latency per image: PyTorch vs ONNX Runtime
    python benchmarks/bench_efficiency.py --quick ... # a seconds-long smoke run of the chosen modes

Data come from STAGEWISE_DATA (default: ../shared/data beside the repository).
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

import numpy as np
import torch

from stagewise.models import Network, create_backbone
from stagewise.recipe import ComputeConfig, DualStage, FinetuneStage, ThawStage, recipe_from_dict
from stagewise.training.cache import ImageSet
from stagewise.training.compute import resolve_compute
from stagewise.training.engine import fit_stage, predict
from stagewise.training.objectives import Objective

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("STAGEWISE_DATA", REPO.parent / "shared" / "data"))


def machine() -> str:
    from stagewise.training.autotune import cpu_model

    cpu = cpu_model()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _mnist(name: str, quick: bool):
    folder = {"mnist": "mnist", "fashion": "fashion-mnist"}[name]
    prefix = {"mnist": "mnist", "fashion": "fashion_mnist"}[name]
    train = np.load(DATA / "mnist-fmnist" / folder / f"{prefix}_train.npz")
    test = np.load(DATA / "mnist-fmnist" / folder / f"{prefix}_test.npz")
    xtr, ytr, xte, yte = train["x"], train["y"], test["x"], test["y"]
    rng = np.random.default_rng(0)  # Fashion-MNIST is stored sorted by class: shuffle (fixed)
    tr, te = rng.permutation(len(xtr)), rng.permutation(len(xte))
    xtr, ytr, xte, yte = xtr[tr], ytr[tr], xte[te], yte[te]
    if quick:
        xtr, ytr, xte, yte = xtr[:2000], ytr[:2000], xte[:500], yte[:500]
    x = torch.from_numpy(np.concatenate([xtr, xte])).unsqueeze(1).half() / 255
    y = torch.from_numpy(np.concatenate([ytr, yte]).astype(np.float32)).unsqueeze(1)
    return ImageSet(x, f"{name}{len(x)}"), y, np.arange(len(xtr)), np.arange(len(xtr), len(x))


def _latency_ms(fn, x, runs=200) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench_tiny(quick: bool) -> None:
    """A single tiny CNN, and the dual-input-output pair (dual stage, then thaw last-first)."""
    compute = resolve_compute(ComputeConfig(device="cpu", precision="fp32", channels_last=False))
    objective = Objective("multiclass", 10)
    aug = {"rotate": 10, "scale": 0.1, "translate": 0.1, "intensity": 0.2}
    def epochs(n: int) -> int:
        return 1 if quick else n

    recipes = {
        "tinycnn (single)": ("scratch:tinycnn", [
            FinetuneStage(epochs=epochs(8), batch_size=64, lr=3e-3, schedule="onecycle",
                        augment={"rotate": 8, "translate": 0.08}),
        ]),
        "tinycnn dual-input-output": ("dual:scratch:tinycnn-6-12-20-20", [
            DualStage(epochs=epochs(6), batch_size=64, lr=3e-3, schedule="onecycle", augment=aug),
            ThawStage(epochs=epochs(2), batch_size=64, lr=5e-4, lr_decay=0.5,
                        unfreeze={"block3": 0.0, "block2": 0.25, "block1": 0.5, "stem": 0.75}),
        ]),
    }
    for dataset in ("mnist", "fashion"):
        images, y, train, test = _mnist(dataset, quick)
        for name, (spec, stages) in recipes.items():
            torch.manual_seed(0)
            net = Network.build(create_backbone(spec), 10, dropout=0.0)
            n_params = sum(p.numel() for p in net.parameters())
            t0 = time.perf_counter()
            for i, stage in enumerate(stages):
                fit_stage(net, stage, images, train, y, compute, None, seed=i, objective=objective)
            seconds = time.perf_counter() - t0
            prob = predict(net, images, test, compute, None, objective)
            acc = float((prob.argmax(1) == y[test, 0].numpy()).mean())
            net.eval()
            one = images.x[test[:1]].float()
            with torch.no_grad():
                latency = _latency_ms(net, one)
            print(f"{dataset:8s} {name:28s} accuracy {acc:.4f}  parameters {n_params:,}  "
                  f"size {n_params * 4 / 2**20:.3f} MB (float32)  latency {latency:.3f} ms/image (batch 1)  "
                  f"train {seconds:.0f} s on {len(train):,} images")


def _covid_manifest(tmp: Path) -> Path:
    out = tmp / "covid.csv"
    subprocess.run([sys.executable, str(REPO / "examples" / "prepare_covid_outcome.py"), "--data", str(DATA),
                    "--out", str(out)], check=True, capture_output=True)
    return out


MEMORY_BACKBONES = ("scratch:resnet18", "scratch:timm:vit_tiny_patch16_224")


def bench_memory(quick: bool, backbones=MEMORY_BACKBONES) -> None:
    """Same folds, same epochs: full fine-tuning vs dynamic freezing (80 % of tensors frozen)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _covid_manifest(Path(tmp))
        for backbone in backbones:
            size = 128 if quick and "vit" not in backbone else 224
            base = {"epochs": 1 if quick else 6, "batch_size": 16, "lr": 1e-3, "schedule": "cosine",
                    "augment": {"flip": True, "rotate": 5}}
            arms = [
                {"name": "finetune", "backbone": backbone, "stages": [{"kind": "finetune", **base}]},
                {"name": "dynamic", "backbone": backbone,
                 "stages": [{"kind": "dynamic", **base, "freeze_fraction": 0.8, "freeze_every": 10}]},
                {"name": "dynamic-8bit", "backbone": backbone,
                 "stages": [{"kind": "dynamic", **base, "freeze_fraction": 0.8, "freeze_every": 10, "activation_bits": 8}]},
            ]
            recipe = recipe_from_dict({
                "name": "memory", "seed": 0,
                "cohort": {"manifest": str(manifest), "outcome": "went_icu", "patient": "patient", "image": "path"},
                "data": {"image_size": size},
                "protocol": {"folds": 2 if quick else 3, "repeats": 1},
                "compute": {"channels_last": False},
                "evaluation": {"saliency": 0, "bootstrap": 0, "report": False},
                "arms": arms,
            })
            from stagewise.study import run_study

            result = run_study(recipe, Path(tmp) / backbone.replace(":", "_"))
            print(f"{backbone} at {size} px, {result.metrics['n_splits']} folds, {base['epochs']} epochs, compute {result.metrics['compute']}")
            ref = None
            for name, arm in result.metrics["arms"].items():
                res = next(iter(arm["resources"].values()))
                auc = arm["summary"]["auroc"]
                act = res["saved_activation_median_bytes"]
                ref = ref or act
                print(f"  {name:14s} AUROC {auc['mean']:.3f} ± {auc['sd']:.3f}  saved activations per step "
                      f"(median) {act / 2**20:8.1f} MiB (x{ref / act:.2f} less than finetune)  peak "
                      f"{res['saved_activation_peak_bytes'] / 2**20:8.1f} MiB  peak RSS {res['peak_rss_bytes'] / 2**30:.2f} GiB  "
                      f"{res['median_seconds_per_fold']:.0f} s/fold")


def bench_export(quick: bool) -> None:
    import onnxruntime as ort

    from stagewise.bundle.export import export_onnx
    from stagewise.bundle.network import SharedHeads

    with tempfile.TemporaryDirectory() as tmp:
        for spec, size in (("scratch:tinycnn", 28), ("scratch:resnet18", 224), ("scratch:resnet50", 224)):
            torch.manual_seed(0)
            net = Network.build(create_backbone(spec)).eval()
            model = SharedHeads(net.backbone, {"task": net.head}).eval()
            path = export_onnx(model, Path(tmp) / "m.onnx", size)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            x = torch.rand(1, 1, size, size)
            with torch.no_grad():
                t_torch = _latency_ms(model, x, runs=20 if quick else 100)
            t_onnx = _latency_ms(lambda v: session.run(None, {"image": v.numpy()}), x, runs=20 if quick else 100)
            with torch.no_grad():
                diff = float(np.abs(session.run(None, {"image": x.numpy()})[0] - model(x).numpy()).max())
            print(f"{spec:22s} {size:4d} px  PyTorch fp32 {t_torch:8.2f} ms/image  ONNX Runtime {t_onnx:8.2f} ms/image  "
                  f"(x{t_torch / t_onnx:.2f})  max |diff| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch: checks the script runs")
    parser.add_argument("--memory-backbones", nargs="+", default=list(MEMORY_BACKBONES))
    args = parser.parse_args()
    print(f"machine: {machine()}; date {time.strftime('%Y-%m-%d')}")
    if args.tiny:
        bench_tiny(args.quick)
    if args.memory:
        bench_memory(args.quick, args.memory_backbones)
    if args.export:
        bench_export(args.quick)


if __name__ == "__main__":
    main()
