"""Global federated vs personalised vs local (and pooled) on the real multi-site example, on the
same folds; optionally a sweep of Flower strategies for the global federated arm.

    python examples/prepare_covid_outcome.py
    python benchmarks/bench_personalised.py [--size 128] [--folds 5] [--out runs/bench-personalised]
    python benchmarks/bench_personalised.py --strategies fedavg,fedavgm,fedadam,fedyogi,fedmedian --size 64
    python benchmarks/bench_personalised.py --schedules 6x1+8x1,3x6+4x6 --personal-base 3x6+4x6
    python benchmarks/bench_personalised.py --size 32 --folds 2 --tiny      # a smoke run: 1 round, 1 epoch

The arms are examples/covid-multisite.yaml's (pooled, local, federated) plus `personalised`:
the federated arm followed by a `site_local` thaw stage at each site (the paper's site-level
fine-tuning), and with `--fedper` one more whose head stays at each site (sites.local_groups).
`--schedules 6x1+8x1,...` adds one federated arm per round schedule (`fed-6x1+8x1`: the probe stage
in 6 rounds of 1 local epoch, the thaw stage in 8 rounds of 1), and `--personal-base` names the
schedule the personalised arm(s) build on (the example's own by default); a schedule with the
suffix `-across` (`fed-3x6+4x6-across`) runs each stage's LR schedule across its rounds.
`--strategies` adds one federated arm per strategy name on the personalised arm's schedule
(`fed-<name>`, Flower's default parameters unless `--params name:key=value,...`). Prints per site the pooled patient-level
AUROC over folds with its patient-bootstrap 95 % CI for every arm side by side, the mean and
sd over folds per arm, DeLong p of each federated arm against pooled, and bytes per site per
round of each federated arm against full-model FedAvg.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "covid-multisite.yaml"


def fmt_ci(ci: dict | None) -> str:
    return "n/a" if not ci else f"{ci['point']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


def parse_params(text: str) -> dict[str, dict[str, float]]:
    """`fedavgm:server_momentum=0.9,fedadam:eta=0.01` -> {fedavgm: {server_momentum: 0.9}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for item in filter(None, text.split(",")):
        name, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        out.setdefault(name, {})[key] = float(value)
    return out


def with_schedule(fed: dict, spec: str) -> dict:
    """The federated arm `fed` with its probe and thaw stages run as `spec` says: `PxE+TxE`, P
    probe rounds of E local epochs each, then T thaw rounds of E local epochs each; with the
    suffix `-across`, each stage's LR schedule spans its rounds (`sites.lr_schedule`)."""
    rounds_spec, _, mode = spec.partition("-")
    (probe_rounds, probe_epochs), (thaw_rounds, thaw_epochs) = (map(int, p.split("x")) for p in rounds_spec.split("+"))
    arm = copy.deepcopy(fed)
    if mode == "across":
        arm["sites"] = {**arm["sites"], "lr_schedule": "across_rounds"}
    for stage in arm["stages"]:
        rounds, epochs = (probe_rounds, probe_epochs) if stage["kind"] == "probe" else (thaw_rounds, thaw_epochs)
        stage.update(rounds=rounds, epochs=epochs)
    return {**arm, "name": f"fed-{spec}"}


def study_data(args) -> dict:
    """The example's recipe with the personalised arm(s) and the strategy sweep added."""
    from stagewise.recipe import read_recipe_data

    data = read_recipe_data(EXAMPLE, [f"data.image_size={args.size}", f"protocol.folds={args.folds}",
                                      "evaluation.report=false", "evaluation.saliency=0"])
    if args.manifest is not None:  # a manifest prepare_covid_outcome.py wrote elsewhere (another checkout)
        data["cohort"]["manifest"] = str(args.manifest.resolve())
    arms = {a["name"]: a for a in data["arms"]}
    fed = arms["federated"]
    schedules = {spec: with_schedule(fed, spec) for spec in filter(None, args.schedules.split(","))}
    base = schedules[args.personal_base] if args.personal_base else fed
    thaw = next(s for s in base["stages"] if s["kind"] == "thaw")
    personal_stage = {**{k: v for k, v in thaw.items() if k != "rounds"}, "site_local": True,
                      "epochs": 1 if args.tiny else args.personal_epochs,
                      "lr": {g: v * args.personal_lr_factor for g, v in thaw["lr"].items()}}
    personalised = {**copy.deepcopy(base), "name": "personalised", "stages": [*copy.deepcopy(base["stages"]), personal_stage]}
    extra = [*schedules.values(), personalised]
    if args.fedper:
        extra.append({**copy.deepcopy(personalised), "name": "fedper", "sites": {**base["sites"], "local_groups": ["head"]}})
    params = parse_params(args.params)
    for name in filter(None, args.strategies.split(",")):
        if name == fed["sites"]["strategy"] and name not in params:
            continue  # the example's own federated arm
        extra.append({**copy.deepcopy(base), "name": f"fed-{name}",
                      "sites": {**base["sites"], "strategy": name, "strategy_params": params.get(name, {})}})
    data["arms"] = [*data["arms"], *extra]
    if args.tiny:  # one round of one epoch per stage: checks the script, measures nothing
        for arm in data["arms"]:
            for stage in arm["stages"]:
                stage["epochs"] = 1
                if "rounds" in stage:
                    stage["rounds"] = 1
    feds = [a["name"] for a in data["arms"] if (a.get("sites") or {}).get("mode") == "federated"]
    data.setdefault("evaluation", {})["compare"] = [[f, "pooled"] for f in feds] + [["personalised", "local"],
                                                                                   ["personalised", base["name"]]]
    return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-personalised")
    ap.add_argument("--strategies", default="", help="comma-separated sites.strategy names to sweep")
    ap.add_argument("--params", default="", help="strategy:key=value,... for the swept strategies")
    ap.add_argument("--schedules", default="", help="comma-separated PxE+TxE round schedules to sweep")
    ap.add_argument("--personal-base", default="", help="the PxE+TxE schedule (one of --schedules) personalisation follows")
    ap.add_argument("--fedper", action="store_true", help="add an arm whose head stays at each site")
    ap.add_argument("--personal-epochs", type=int, default=4)
    ap.add_argument("--personal-lr-factor", type=float, default=0.3, help="x the federated thaw stage's LRs")
    ap.add_argument("--manifest", type=Path, default=None, help="the prepared cohort CSV, if not the example's")
    ap.add_argument("--tiny", action="store_true", help="1 round x 1 epoch per stage: a smoke run only")
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

    from stagewise.recipe import recipe_from_dict
    from stagewise.study import run_study

    recipe = recipe_from_dict(study_data(args), source=str(EXAMPLE), base_dir=EXAMPLE.parent.resolve())
    load = os.getloadavg()
    t0 = time.perf_counter()
    result = run_study(recipe, args.out)
    wall = time.perf_counter() - t0
    m, ev = result.metrics, result.metrics["evidence"]
    models = [n for n, u in m["arms"].items() if u["kind"] == "model"]
    print(f"covid-multisite, {args.size} px, {m['n_splits']} folds{' (--tiny: a smoke run)' if args.tiny else ''}; "
          f"study wall {wall:.0f} s; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs")
    print("\narm              mode        AUROC mean ± sd over folds   pooled patient AUROC [95% bootstrap CI]")
    for name in models:
        u, s = m["arms"][name], m["arms"][name]["summary"]["auroc"]
        print(f"{name:16s} {u['training']:11s} {s['mean']:.3f} ± {s.get('sd', float('nan')):.3f}"
              f"{'':16s}{fmt_ci(ev['units'][name].get('bootstrap_ci', {}).get('auroc'))}")
    sites = list(dict.fromkeys(s for n in models for s in ev["units"][n].get("sites", {})))
    print("\nper site: pooled patient-level AUROC over folds [95% patient-bootstrap CI]")
    print(f"{'arm':16s} " + "  ".join(f"{s:28s}" for s in sites))
    for name in models:
        per = ev["units"][name].get("sites", {})
        print(f"{name:16s} " + "  ".join(f"{fmt_ci((per.get(s) or {}).get('auroc_bootstrap_ci')):28s}" for s in sites))
    print()
    for c in ev["comparisons"]:
        d = c.get("delong", {})
        print(f"  {c['a']} vs {c['b']}: DeLong p = {d.get('p', float('nan')):.3f}")
    print("\nbytes per site per round (mean over rounds, down + up), against full-model FedAvg:")
    for name in models:
        st = m["arms"][name].get("sites_training") or {}
        if st.get("mode") != "federated" or not st.get("rounds"):
            continue
        per_round = [r["bytes_down_per_site"] + sum(r["bytes_up"]) / max(1, len(r["bytes_up"])) for r in st["rounds"]]
        full = st["bytes_full_model_fedavg_per_fold"] / max(1, sum(r["sites"] for r in st["rounds"]))
        print(f"  {name:16s} {sum(per_round) / len(per_round) / 1e3:10.1f} kB vs {full / 1e3:10.1f} kB "
              f"({st['strategy']}{', personalised' if 'personalised' in st else ''})")


if __name__ == "__main__":
    main()
