"""Privacy against utility on the real multi-site example: the federated arm without DP and
with record-level DP-SGD at each site (`sites.privacy`) at three target epsilons, same folds.

    python examples/prepare_covid_outcome.py
    python benchmarks/bench_privacy.py [--size 64] [--folds 3] [--rounds 5] [--out runs/bench-privacy]

DP-SGD cannot train groups with BatchNorm (their train-mode batch statistics mix the images of
a batch), so every DP arm here is a federated linear probe (the head on the frozen backbone;
FedAvg; no balanced sampling, which DP-SGD's Poisson sampling replaces). The same probe without
DP isolates the cost of the noise; the recipe's own federated arm (probe + thaw) shows what
training the backbone adds without DP. Prints per arm the AUROC (mean ± sd over folds, pooled
patient-bootstrap CI) and per site the epsilon Opacus' RDP accountant says was spent (the
largest over the folds), the noise multiplier and the DP-SGD steps.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_core import loadavg  # noqa: E402

EPSILONS = (1.0, 8.0, 50.0)  # strongest first: on a loaded machine the run may be cut short


def fmt_ci(ci: dict | None) -> str:
    return "n/a" if not ci else f"{ci['point']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def arms(data: dict, rounds: int, epochs: int, full: bool) -> list[dict]:
    """The recipe's federated arm (without DP), its probe alone, and the probe under DP-SGD."""
    fed = next(a for a in data["arms"] if a["name"] == "federated")
    probe = {**copy.deepcopy(fed["stages"][0]), "rounds": rounds, "epochs": epochs, "balanced_sampling": False}
    base = {"backbone": fed["backbone"], "sites": {"mode": "federated", "strategy": "fedavg"}, "stages": [probe]}
    out = [fed] if full else []
    out.append({**copy.deepcopy(base), "name": "probe-no-dp"})
    for eps in EPSILONS:
        arm = copy.deepcopy(base)
        arm["name"] = f"probe-dp-eps{eps:g}"
        arm["sites"]["privacy"] = {"target_epsilon": eps, "delta": 1e-5, "clip": 1.0}
        out.append(arm)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the probe")
    ap.add_argument("--epochs", type=int, default=2, help="local epochs of each probe round")
    ap.add_argument("--no-full", action="store_true", help="leave out the recipe's probe + thaw arm")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-privacy")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from stagewise.recipe import read_recipe_data, recipe_from_dict
    from stagewise.study import run_study

    path = REPO / "examples" / "covid-multisite.yaml"
    data = read_recipe_data(path, [f"data.image_size={args.size}", f"protocol.folds={args.folds}",
                                   "evaluation.report=false", "evaluation.saliency=0"])
    data["arms"] = arms(data, args.rounds, args.epochs, not args.no_full)
    data["evaluation"]["compare"] = [[f"probe-dp-eps{e:g}", "probe-no-dp"] for e in EPSILONS]
    recipe = recipe_from_dict(data, source=str(path), base_dir=path.parent.resolve())
    print(f"load average before: {loadavg()}", flush=True)
    t0 = time.perf_counter()
    result = run_study(recipe, args.out)
    wall = time.perf_counter() - t0
    m, ev = result.metrics, result.metrics["evidence"]
    print(f"covid-multisite, {args.size} px, {m['n_splits']} folds; probe {args.rounds} rounds x {args.epochs} local epochs; "
          f"study wall {wall:.0f} s; load average after: {loadavg()}")
    print("\narm               AUROC mean ± sd   pooled AUROC [95% CI]      max site epsilon (delta 1e-5)  train s")
    for name, u in m["arms"].items():
        if u["kind"] != "model":
            continue
        s = u["summary"]["auroc"]
        priv = u["sites_training"].get("privacy")
        eps = "no DP" if not priv else (f"{priv['max_epsilon']:.2f}" if priv["max_epsilon"] is not None else "inf")
        print(f"{name:17s} {s['mean']:.3f} ± {s['sd']:.3f}    "
              f"{fmt_ci(ev['units'][name].get('bootstrap_ci', {}).get('auroc')):26s} {eps:30s} {u['train_seconds']:.0f}")
    print("\nper site: epsilon spent (largest over folds), noise multiplier(s), DP-SGD steps per fold, AUROC mean ± sd")
    for name, u in m["arms"].items():
        priv = (u.get("sites_training") or {}).get("privacy")
        if not priv:
            continue
        for site, p in priv["sites"].items():
            a = u["sites"][site]["auroc"]
            print(f"  {name:17s} {site:16s} {p['statement']:60s} noise {', '.join(f'{n:.2f}' for n in p['noise_multiplier'])}"
                  f"  steps {sorted(set(p['steps_per_fold']))}  AUROC {a['mean']:.3f} ± {a['sd']:.3f}")
    for c in ev["comparisons"]:
        d = c.get("delong", {})
        print(f"  {c['a']} vs {c['b']}: DeLong p = {d.get('p', float('nan')):.3f}")


if __name__ == "__main__":
    main()
