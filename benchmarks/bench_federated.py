"""Pooled vs local vs federated training on the real multi-site example (same folds).

    python examples/prepare_covid_outcome.py
    python benchmarks/bench_federated.py [--size 64] [--out runs/bench-federated] [--loso]

Prints AUROC (mean ± sd over folds, pooled patient-bootstrap CI) per arm, overall and per
site; bytes sent per round with partial sharing against full-model FedAvg; and wall time of
each arm (the federated arm includes Flower's simulation engine starting once per fold).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fmt_ci(ci: dict | None) -> str:
    return "n/a" if not ci else f"{ci['point']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-federated")
    ap.add_argument("--loso", action="store_true", help="leave-one-site-out (pooled vs federated)")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from stagewise.recipe import load_recipe
    from stagewise.study import run_study

    overrides = [f"data.image_size={args.size}", "evaluation.report=false", "evaluation.saliency=0"]
    if args.loso:
        overrides += ["protocol.kind=leave_one_site_out", "arms.1.sites.mode=pooled", "arms.1.name=pooled-copy",
                      "evaluation.compare=[[federated, pooled]]"]
    recipe = load_recipe(REPO / "examples" / "covid-multisite.yaml", overrides)
    load = os.getloadavg()
    t0 = time.perf_counter()
    result = run_study(recipe, args.out)
    wall = time.perf_counter() - t0
    m, ev = result.metrics, result.metrics["evidence"]
    print(f"covid-multisite, {args.size} px, {m['n_splits']} folds ({recipe.protocol.kind}); "
          f"study wall {wall:.0f} s; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("\narm        mode        AUROC mean ± sd   pooled AUROC [95% bootstrap CI]   train s")
    for name, u in m["arms"].items():
        if u["kind"] != "model":
            continue
        s = u["summary"]["auroc"]
        print(f"{name:10s} {u['training']:11s} {s['mean']:.3f} ± {s['sd']:.3f}     "
              f"{fmt_ci(ev['units'][name].get('bootstrap_ci', {}).get('auroc')):32s}  {u['train_seconds']:.0f}")
    print("\nper site (pooled patient-level AUROC over folds [95% bootstrap CI]):")
    for name, u in m["arms"].items():
        if u["kind"] == "model":
            sites = ev["units"][name].get("sites", {})
            print(f"  {name:10s} " + "; ".join(f"{s} {fmt_ci(v.get('auroc_bootstrap_ci'))} (n={v['n_patients']})"
                                                for s, v in sites.items()))
    for c in ev["comparisons"]:
        d, t = c.get("delong", {}), c.get("corrected_t", {})
        print(f"  {c['a']} vs {c['b']}: DeLong p = {d.get('p', float('nan')):.3f}, corrected t p = {t.get('p', float('nan')):.3f}")
    fed = m["arms"]["federated"]["sites_training"]
    print(f"\nfederated ({fed['strategy']}, bn_stats {fed['bn_stats']}): bytes per fold {fed['bytes_per_fold'] / 1e6:.2f} MB "
          f"vs {fed['bytes_full_model_fedavg_per_fold'] / 1e6:.1f} MB for full-model FedAvg "
          f"({fed['bytes_full_model_fedavg_per_fold'] / fed['bytes_per_fold']:.0f}x less)")
    print("round  groups                 down/site     up (per site)")
    for r in fed["rounds"]:
        print(f"{r['round']:5d}  {','.join(r['trainable']):22s} {r['bytes_down_per_site']:10,d} B  "
              f"{', '.join(f'{b:,d}' for b in r['bytes_up'])}")
    if "local" in m["arms"] and "sites_training" in m["arms"]["local"]:
        print("\nlocal arm, cross-site AUROC (row: model's site, column: test site), mean over folds:")
        for a, row in m["arms"]["local"]["sites_training"]["cross_site_auroc"].items():
            print(f"  {a:16s} " + "  ".join(f"{b}: {v:.3f}" if v is not None else f"{b}: n/a" for b, v in row.items()))


if __name__ == "__main__":
    main()
