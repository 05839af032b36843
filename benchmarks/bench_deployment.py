"""A federated job deployed across three hospitals on this machine, driven through the CLI,
against the same job in Flower's simulation engine.

    python examples/prepare_covid_outcome.py --per-site
    python benchmarks/bench_deployment.py [--size 64] [--folds 3] [--out runs/bench-deployment] [--secure-aggregation]
    python benchmarks/bench_deployment.py --timeline runs/bench-deployment/deployed

Each "hospital" (hannover, southern-europe, elsewhere: see examples/covid-multisite.yaml) runs
`stagewise federation site` with its own manifest, key and work folder; the coordinator runs
`stagewise federation coordinate` (TLS, node authentication) on 127.0.0.1. Prints per-site
AUROC (mean ± sd over each site's own folds), the largest difference from the simulated job,
bytes on the wire against full-model FedAvg, the wall time of both and where the deployed
job's went (job file, admission, first and last message, each fit and round), and the CPU
seconds of each kind of process of both (SuperLink, ServerApp, SuperNodes, site processes;
Ray's). With `--secure-aggregation`, the deployed job again under SecAgg+, its wall time and
bytes beside.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from bench_core import loadavg  # noqa: E402
from stagewise.training.autotune import cpu_model  # noqa: E402

SITES = ["hannover", "southern-europe", "elsewhere"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stagewise(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stagewise", *args], **kw)


ROLES = [(("superlink_process",), "SuperLink"), (("flwr-serverapp",), "ServerApp"),
         (("stagewise.federated.polling",), "SuperNodes"), (("stagewise.federated.site_process",), "site processes"),
         (("/ray/", "raylet", "gcs_server"), "Ray"), (("",), "command lines")]
"""A process's role by its command line (the first match), for `CpuMeter`; the rest are the
coordinator's and sites' `stagewise federation` commands and `flwr run`."""


class CpuMeter:
    """CPU seconds (user + system) of every process below this one, by role (`ROLES`), read
    from /proc every 0.2 s while it runs (Linux); a process's last 0.2 s may be missed."""

    def __init__(self):
        self.seen: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _poll(self) -> None:
        tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
        while not self.stop.wait(0.2):
            parents, cpu = {}, {}
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    f = stat.read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                pid = int(stat.parent.name)
                parents[pid], cpu[pid] = int(f[1]), (int(f[11]) + int(f[12])) / tick
            for pid in cpu:
                p = pid
                while p in parents and p != me:
                    p = parents[p]
                if p != me or pid == me:
                    continue
                if pid not in self.seen:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    program = cmd.split(" -- ")[0]  # a site process's command line holds its SuperNode's after --
                    role = next(name for keys, name in ROLES if any(k in program for k in keys))
                    self.seen[pid] = (role, 0.0)
                self.seen[pid] = (self.seen[pid][0], cpu[pid])

    def by_role(self) -> dict[str, float]:
        total: dict[str, float] = defaultdict(float)
        for role, seconds in self.seen.values():
            total[role] += seconds
        return dict(total)


def cpu_line(what: str, meter: CpuMeter) -> str:
    roles = meter.by_role()
    return (f"  CPU of {what}: {sum(roles.values()):.0f} s (" +
            ", ".join(f"{name} {roles[name]:.1f} s" for _, name in ROLES if name in roles) + ")")


def deploy(out: Path, recipe_path: Path, manifests: dict, tag: str) -> float:
    """Run the job over 127.0.0.1 through the CLI (coordinator and three sites, site work
    folders and the run directory named with `tag`); its wall time in seconds. Prints where
    that time went (`timeline`)."""
    port = free_port()
    started = time.time()
    t0 = time.perf_counter()
    with CpuMeter() as meter:
        code, returned = _run_deployment(out, recipe_path, manifests, tag, port)
    if code != 0:
        sys.exit(f"coordinator exit {code}; see {out / f'coordinator{tag}.log'}")
    wall = time.perf_counter() - t0
    print(timeline(out / f"deployed{tag}", started, started + wall, returned))
    print(cpu_line(f"deployed{tag}", meter))
    return wall


def _run_deployment(out: Path, recipe_path: Path, manifests: dict, tag: str, port: int) -> tuple[int, float]:
    """The coordinator and the three sites as processes of their own; the coordinator's exit
    code and when it exited (the sites are stopped after it, within the measured time)."""
    coord = stagewise("federation", "coordinate", str(recipe_path), "--arm", "federated", "--certs", str(out / "certs"),
                      *[x for s in SITES for x in ("--site-key", str(out / "keys" / f"{s}.pub"))],
                      "--host", "127.0.0.1", "--port", str(port), "--no-final", "-o", str(out / f"deployed{tag}"),
                      stdout=(out / f"coordinator{tag}.log").open("wb"), stderr=subprocess.STDOUT)
    sites = [stagewise("federation", "site", str(recipe_path), "--manifest", str(manifests[s]), "--site", s,
                       "--server", f"127.0.0.1:{port}", "--ca", str(out / "certs" / "ca.pem"),
                       "--key", str(out / "keys" / f"{s}.key"), "--workdir", str(out / f"site-{s}{tag}"),
                       "--threads", "1", "--port", str(free_port()),
                       stdout=(out / f"site-{s}{tag}.log").open("wb"), stderr=subprocess.STDOUT) for s in SITES]
    try:
        code = coord.wait(6 * 3600)
        returned = time.time()
    finally:
        for p in sites:
            p.terminate()
        for p in sites:
            p.wait(60)
    return code, returned


def timeline(run: Path, started: float, ended: float | None = None, returned: float | None = None) -> str:
    """Where a deployed job's time went, from its run directory: when the coordinator wrote
    its job file and its list of admitted sites, the first and last message on the wire
    (`federation/wire.jsonl`), when the coordinator's command returned (`returned`) and the
    sites' had stopped (`ended`), each fold's span and its rounds' (sent to the last reply)."""
    wire = [json.loads(line) for line in (run / "federation" / "wire.jsonl").read_text().splitlines()]
    since = lambda t: t - started  # noqa: E731
    admitted = run / "federation" / "admitted.json"
    lines = [f"  timeline of {run.name}: job file {since((run / 'job.json').stat().st_mtime):.1f} s, "
             + (f"sites admitted {since(admitted.stat().st_mtime):.1f} s, " if admitted.is_file() else "")
             + f"first message {since(wire[0]['time']):.1f} s, last reply {since(wire[-1]['time']):.1f} s"
             + (f", coordinator returned {since(returned):.1f} s" if returned else "")
             + (f", end {since(ended):.1f} s" if ended else "")]
    exchanges = []  # (message type, first sent, last reply): a round, a scoring, a greeting
    for e in wire:
        if e["direction"] == "down" and (not exchanges or exchanges[-1][2] is not None):
            exchanges.append([e["type"], e["time"], None])
        elif e["direction"] == "up" and exchanges:
            exchanges[-1][2] = e["time"]
    rounds, fold_start = [], None
    for kind, sent, replied in exchanges:
        if kind == "train":
            fold_start = fold_start or sent
            rounds.append(f"{replied - sent:.1f}")
        elif kind == "evaluate" and fold_start is not None:
            lines.append(f"  fit {len(lines)}: {replied - fold_start:.1f} s; rounds {' '.join(rounds)} s; "
                         f"scoring {replied - sent:.1f} s")
            rounds, fold_start = [], None
    return "\n".join(lines)


def secure_comparison(out: Path, recipe: dict, manifests: dict, plain_wall: float) -> None:
    """The same job again under secure aggregation (Flower's SecAgg+ with its defaults):
    its wall time and bytes on the wire (every SecAgg+ stage's messages) beside the plain run's."""
    from stagewise.federated.deployment import JobDir

    recipe = json.loads(json.dumps(recipe))
    recipe["arms"][0]["sites"]["secure_aggregation"] = True
    path = out / "recipe-secagg.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    wall = deploy(out, path, manifests, "-secagg")
    plain, secure = (json.loads((out / d / "results.json").read_text()) for d in ("deployed", "deployed-secagg"))
    fits = [json.loads(JobDir(out / "deployed-secagg").fit_file(f).read_text()) for f in secure["fits_finished"]]
    secagg_bytes = sum(r["secure_aggregation"]["bytes_all_stages"] if "secure_aggregation" in r else
                       r["bytes_down_per_site"] * r["sites"] + sum(r["bytes_up"]) for f in fits for r in f["rounds"])
    means = [(secure["sites"][s]["auroc"]["mean"], plain["sites"][s]["auroc"]["mean"]) for s in SITES]
    diff = max((abs(a - b) for a, b in means if None not in (a, b)), default=float("nan"))
    print(f"secure aggregation (SecAgg+, Flower's defaults): wall {wall:.0f} s vs {plain_wall:.0f} s without; "
          f"bytes on the wire {secagg_bytes / 1e6:.1f} MB (every stage: keys, shares, masked vectors) vs "
          f"{plain['bytes_total'] / 1e6:.1f} MB; largest |AUROC difference| of a site's mean: {diff:.2e}; "
          f"largest error bound of an unmasked mean: {secure['secure_aggregation']['largest_error_bound']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--rounds", type=int, nargs=2, default=None, metavar=("PROBE", "THAW"),
                    help="rounds of the probe and thaw stages (default: the example's 3 and 4)")
    ap.add_argument("--epochs", type=int, default=2,
                    help="local epochs per round of both stages (2: the job of the figures in RESULTS.md)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "bench-deployment")
    ap.add_argument("--secure-aggregation", action="store_true",
                    help="also deploy the job under secure aggregation (SecAgg+) and print its wall time and bytes")
    ap.add_argument("--timeline", type=Path, metavar="RUN",
                    help="print where an earlier run's deployed job (its --out folder's `deployed`) spent its time, "
                         "from the end of its key making on, and exit")
    args = ap.parse_args()
    if args.timeline:
        print(timeline(args.timeline, (args.timeline.parent / "cli.log").stat().st_mtime))
        return
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    cohorts = REPO / "runs" / "cohorts"
    manifests = {s: cohorts / f"covid-outcome-{s}.csv" for s in SITES}
    if missing := [str(p) for p in manifests.values() if not p.is_file()]:
        sys.exit(f"missing {missing}: run `python examples/prepare_covid_outcome.py --per-site` first")
    out = args.out.resolve()
    if out.exists():
        sys.exit(f"{out} exists; give a new --out")
    out.mkdir(parents=True)

    recipe = yaml.safe_load((REPO / "examples" / "covid-multisite.yaml").read_text())
    recipe["data"]["image_size"] = args.size
    recipe["protocol"]["folds"] = args.folds
    recipe["arms"] = [a for a in recipe["arms"] if a["name"] == "federated"]
    for stage in recipe["arms"][0]["stages"]:
        stage["epochs"] = args.epochs
    if args.rounds:
        for stage, rounds in zip(recipe["arms"][0]["stages"], args.rounds, strict=True):
            stage["rounds"] = rounds
    recipe["cohort"].pop("site")  # each hospital's manifest is one site
    recipe["cohort"]["manifest"] = "site.csv"
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    log = (out / "cli.log").open("ab")
    run = lambda *a: subprocess.run([sys.executable, "-m", "stagewise", *a], check=True, stdout=log, stderr=log)  # noqa: E731
    run("federation", "certs", str(out / "certs"), "--host", "127.0.0.1")
    for s in SITES:
        run("federation", "key", str(out / "keys"), "--site", s)
    load_before = loadavg()
    deployed_wall = deploy(out, recipe_path, manifests, "")

    from stagewise.federated.deployment import JobDir, simulate_job

    sim = JobDir(out / "simulated")
    sim.write_job(recipe_path, "federated", sites=3, cv=True, final=False)
    t1 = time.perf_counter()
    own = time.process_time()
    with CpuMeter() as sim_meter:
        simulate_job(sim.path, [str(out / f"site-{s}" / "site.json") for s in SITES])
    sim_wall = time.perf_counter() - t1
    print(cpu_line("simulated", sim_meter) + f"; and this process, the simulation's driver: "
          f"{time.process_time() - own:.1f} s")

    dep = json.loads((out / "deployed" / "results.json").read_text())
    simres = json.loads((sim.path / "results.json").read_text())
    diff = 0.0
    for f in sim.job().fits():
        a = json.loads(JobDir(out / "deployed").fit_file(f).read_text())["sites"]
        b = json.loads(sim.fit_file(f).read_text())["sites"]
        diff = max([diff, *(abs(a[s][k] - b[s][k]) for s in b for k in b[s] if None not in (a[s][k], b[s][k]))])
    print(f"{cpu_model()}; load average before {load_before}, after {loadavg()}")
    rounds = [st["rounds"] for st in recipe["arms"][0]["stages"]]
    print(f"covid-multisite federated arm, {args.size} px, rounds {rounds} of {args.epochs} local epochs, "
          f"{args.folds} folds per site, 3 hospitals on 127.0.0.1 (TLS + node authentication), "
          f"{len(dep['fits_finished'])} fits")
    print(f"{'site':16s} {'deployed AUROC':>18s} {'simulated AUROC':>18s} test patients")
    for s in SITES:
        d, m = dep["sites"][s]["auroc"], simres["sites"][s]["auroc"]
        print(f"{s:16s} {d['mean']:.3f} ± {d['sd']:.3f}      {m['mean']:.3f} ± {m['sd']:.3f}      "
              f"{dep['sites'][s]['n_test_patients']}")
    a = dep["auroc_across_sites"]
    print(f"across sites (weighted by test patients): {a['mean']:.3f} ± {a['sd']:.3f}")
    print(f"largest |deployed - simulated| over every site metric of every fold: {diff:.2e}")
    held = sum(r.get("bytes_held_per_site", 0) * r["sites"] for f in dep["fits_finished"]
               for r in json.loads(JobDir(out / "deployed").fit_file(f).read_text())["rounds"])
    print(f"bytes on the wire in the training rounds {dep['bytes_total'] / 1e6:.1f} MB vs full-model FedAvg "
          f"{dep['bytes_full_model_fedavg'] / 1e6:.1f} MB ({dep['bytes_full_model_fedavg'] / dep['bytes_total']:.1f}x); "
          f"starting weights named, not sent (each site took its own): {held / 1e6:.1f} MB")
    print(f"wall: deployed {deployed_wall:.0f} s (CLI, SuperLink + 3 SuperNodes, one long-lived process per site), "
          f"simulated {sim_wall:.0f} s")
    if args.secure_aggregation:
        secure_comparison(out, recipe, manifests, deployed_wall)


if __name__ == "__main__":
    main()
