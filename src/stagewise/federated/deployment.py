"""A federated job over the network: the Flower ServerApp and ClientApp of a deployment.

The coordinating site runs a Flower SuperLink (TLS, SuperNode authentication) and submits this
module's `server_app`; each hospital runs a SuperNode whose ClientApp is this module's
`client_app`, on its own machine with its own manifest (see `federated.launch` and the
`stagewise federation` commands). The Flower app that is submitted carries no code: both
components are the stagewise installed at each site, so a hospital runs only what it installed.

The server (`run_job`) greets every site (its name and the digest of the job it agreed to: a
site running another recipe is refused), then runs each fit of the job with the round loop of
`federated.rounds`, the same loop a study's simulation runs, checkpointing every round into
the run directory so that a stopped coordinator continues from the last finished round;
finished fits are never run again. `federation/wire.jsonl` summarises every message (tensor
names and bytes, config and metric items) for the audit. `simulate_job`: the same job in
Flower's simulation engine on one machine."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from stagewise.federated.job import FINAL, SiteConfig
from stagewise.federated.job_dir import RUN_DIR_ENV, SITE_KEY, JobDir
from stagewise.federated.sharing import from_start_of
from stagewise.federated.site_work import SiteWork
from stagewise.federated.linkage import greeting_links, linkage_warning, shared_patients
from stagewise.federated.polling import PromptGrid, prompt_object_pulls
from stagewise.federated.rounds import (AdmittedGrid, AuditedGrid, FederatedError, FederatedResult, round_plan, serve_rounds,
                                        subset_of, wait_for_sites)
from stagewise.federated.simulation import simulation_backend
from stagewise.models import save_network
from stagewise.federated.client_app import make_client_app as client_app_over
from stagewise.federated.secure_aggregation import secure_summary
from stagewise.federated.wire import PackingGrid, WireLog
from stagewise.io import atomic_write, strict_json
from stagewise.training.privacy_budget import job_privacy

log = logging.getLogger("stagewise")

# -- the server side -----------------------------------------------------------------------


def _greet(grid, n: int, need: int, arm: str, digest: str, timeout: float, reply_timeout: float
           ) -> tuple[dict[int, str], dict]:
    """Node id -> site name of every connected site, each checked to run this job, and the
    record of patients present at several sites (linkage.py). Waits up to `timeout` for all
    `n` sites; goes on with fewer if at least `need` (sites.min_sites) came."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    try:
        ids = wait_for_sites(grid, n, timeout)
    except FederatedError:
        ids = list(grid.get_node_ids())
        if len(ids) < need:
            raise
        log.warning("%d of %d sites connected within %.0f s; going on with them (sites.min_sites %d)",
                    len(ids), n, timeout, need)
    msgs = [Message(RecordDict({"config": ConfigRecord({"arm": arm, "job": digest})}), message_type=MessageType.QUERY,
                    dst_node_id=node) for node in ids]
    names, problems, links, checks = {}, [], {}, {}
    for reply in grid.send_and_receive(msgs, timeout=reply_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            problems.append(f"node {node}: {str(reply.error.reason)[:300]}")
            continue
        c = reply.content["config"]
        if c["job"] != digest:
            problems.append(f"site {c['site']} runs job {c['job']}, not {digest}: its recipe differs from the "
                            "coordinator's (arm, data, protocol, seed or outcome)")
        names[node] = str(c["site"])
        links[names[node]] = str(c["patient-links"]).split(",") if "linkage-check" in c else None
        checks[names[node]] = str(c["linkage-check"]) if "linkage-check" in c else None
    if len(set(names.values())) < len(names):
        problems.append(f"two sites share a name: {sorted(names.values())}")
    if problems or len(names) < need:
        raise FederatedError("; ".join(problems) or f"{len(names)} of {n} sites answered")
    return names, shared_patients(links, checks)


def run_job(grid, job_dir: JobDir, run_id: str = "") -> dict:
    """Every fit of the job in `job_dir` that has not finished, then the summary."""
    job, spec = job_dir.job(), job_dir.spec()
    cfg, digest, n = job.arm.sites, spec["digest"], int(spec["sites"])
    wire = PackingGrid(AuditedGrid(PromptGrid(grid), WireLog(job_dir.fed / "wire.jsonl")))  # audited as sent
    job_dir.status(state="running", run=run_id, digest=digest)
    # The greeting is each site's first message: its answer waits for the site's app to start,
    # which on a busy machine takes longer than a round may; it gets the connection timeout too.
    connect = float(spec.get("connect_timeout", cfg.round_timeout))
    admitted = {site["node"] for site in job_dir.admitted().values()}
    names, linkage = _greet(AdmittedGrid(wire, admitted) if admitted else wire, n, min(cfg.min_sites or n, n),
                            job.arm.name, digest, connect, max(connect, cfg.round_timeout))
    atomic_write(job_dir.fed / "linkage.json", strict_json(linkage))
    if note := linkage_warning(linkage):
        log.warning(note)
    # from here on only the greeted sites (admitted, running this job) are asked and heard:
    # a node that connects later, or whose key the coordinator did not list, is dropped
    wire = AdmittedGrid(wire, set(names))
    order = lambda m: names.get(m.metadata.src_node_id, "")  # noqa: E731 - aggregation in site-name order
    for fit in job.fits():
        if job_dir.fit_file(fit).is_file():
            continue  # finished before a restart: never recomputed
        start = job.start(fit)
        out = FederatedResult.starting_from(start)
        resumed = job_dir.last_checkpoint(fit, out)
        if resumed:
            log.info("fit %s continues after round %d", fit, resumed)
        serve_rounds(wire, cfg, round_plan(job.arm, start.group_names), start, out, n, order,
                     extra_config={"arm": job.arm.name, "fit": fit, "job": digest}, resume=resumed,
                     on_round=lambda t, o, fit=fit: job_dir.checkpoint(fit, t, o))
        site_metrics = _evaluate(wire, names, out, {"arm": job.arm.name, "fit": fit, "job": digest}, cfg.round_timeout)
        record = {"fit": fit, "resumed_after_round": resumed, "sites": site_metrics, "rounds": out.rounds,
                  "full_model_bytes": out.full_model_bytes}
        if dropped := wire.take_dropped():  # replies to the evaluation from nodes not of this job
            record["dropped_replies_from_nodes"] = dropped
        if fit == FINAL:
            start.load_state_dict(out.global_state)
            save_network(start, job_dir.path / "model" / f"{job.arm.name}.safetensors")
        job_dir.fit_file(fit).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(job_dir.fit_file(fit), strict_json(record))
    summary = summarize_job(job_dir)
    atomic_write(job_dir.path / "results.json", strict_json(summary))
    job_dir.status(state="finished", run=run_id, digest=digest)
    return summary


def _evaluate(grid, names: dict[int, str], out: FederatedResult, config: dict, timeout: float) -> dict:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    down = ArrayRecord(torch_state_dict=subset_of(out.global_state, out.shared))
    msgs = [Message(RecordDict({"arrays": down, "config": ConfigRecord(config)}),
                    message_type=MessageType.EVALUATE, dst_node_id=node) for node in grid.get_node_ids()]
    metrics = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        site = names.get(reply.metadata.src_node_id, str(reply.metadata.src_node_id))
        metrics[site] = {"error": str(reply.error.reason)[:300]} if reply.has_error() else dict(reply.content["metrics"].items())
    return dict(sorted(metrics.items()))


def summarize_job(job_dir: JobDir) -> dict:
    """Per site and across sites: fold metrics as mean and sd over folds; bytes on the wire."""
    job = job_dir.job()
    fits = {f: json.loads(job_dir.fit_file(f).read_text()) for f in job.fits() if job_dir.fit_file(f).is_file()}
    folds = [r for f, r in fits.items() if f != FINAL]
    sites = sorted({s for r in folds for s in r["sites"]})
    per_site = {}
    for s in sites:
        values = [r["sites"][s] for r in folds if "auroc" in r["sites"].get(s, {})]
        per_site[s] = {k: _mean_sd([v.get(k) for v in values]) for k in ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity")}
        per_site[s]["n_test_patients"] = int(sum(v.get("n_test_patients", 0) for v in values))
        per_site[s]["folds"] = len(values)
    overall = []  # per fold: the sites' AUROC weighted by their test patients
    for r in folds:
        pairs = [(v["auroc"], v["n_test_patients"]) for v in r["sites"].values()
                 if v.get("auroc") is not None and np.isfinite(v["auroc"])]
        if pairs:
            overall.append(float(np.average([a for a, _ in pairs], weights=[w for _, w in pairs])))
    rounds = [x for r in fits.values() for x in r["rounds"]]
    sent = sum(x["bytes_down_per_site"] * x["sites"] + sum(x["bytes_up"]) for x in rounds)
    full = sum(2 * r["full_model_bytes"] * x["sites"] for r in fits.values() for x in r["rounds"])
    return {
        "digest": job_dir.spec()["digest"], "arm": job.arm.name, "strategy": job.arm.sites.strategy,
        "fits_finished": list(fits), "sites": per_site,
        "auroc_across_sites": _mean_sd(overall) | {"weighting": "test patients per site, per fold"},
        "rounds_with_missing_sites": [{"fit": f, "round": x["round"], "sites_replied": x["sites_replied"],
                                       "failures": x["failures"]} for f, r in fits.items() for x in r["rounds"]
                                      if x["sites_replied"] < x["sites"]],
        "bytes_total": int(sent), "bytes_full_model_fedavg": int(full),
        "model": f"model/{job.arm.name}.safetensors" if FINAL in fits else None,
        "patient_linkage": json.loads(linkage.read_text()) if (linkage := job_dir.fed / "linkage.json").is_file() else None,
        **({"privacy": job_privacy(job.arm.sites.privacy, [r["rounds"] for r in folds],
                                   fits[FINAL]["rounds"] if FINAL in fits else None)} if job.arm.sites.privacy else {}),
        **({"secure_aggregation": secure_summary(secure, rounds)} if (secure := job.arm.sites.secure_aggregation) else {}),
    }


def _mean_sd(values: list[float]) -> dict:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return {"mean": float(np.mean(v)) if v else None, "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def make_server_app(job_dir: str | Path | None = None):
    """The ServerApp of a job; `job_dir` defaults to the directory the coordinator names in
    the process environment."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        folder = JobDir(job_dir or os.environ[RUN_DIR_ENV])
        logging.getLogger("flwr").setLevel(logging.ERROR)
        prompt_object_pulls()  # the sites' replies are pulled as soon as their objects are in
        run_id = str(context.run_id)
        try:
            run_job(grid, folder, run_id)
        except (SystemExit, KeyboardInterrupt):  # the coordinator was stopped: resumable
            folder.status(state="stopped", run=run_id)
            raise
        except BaseException as err:
            folder.status(state="failed", run=run_id, error=f"{type(err).__name__}: {err}")
            raise

    return app


# -- the site side -------------------------------------------------------------------------


_WORK: dict[tuple[str, str], SiteWork] = {}


def _site_work(site_file: str, arm: str) -> SiteWork:
    """The site's work for `arm`, loaded once per process: a stagewise site's one long-lived
    process (`site_process`) answers every message of the job with it."""
    key = (site_file, arm)
    if key not in _WORK:
        _WORK[key] = SiteWork(SiteConfig.load(site_file), arm)
    return _WORK[key]


class JobRefused(FederatedError):
    """A site's refusal of a coordinator's job: the site leaves (`site_process` ends)."""

    ends_site = True


class DiskSite:
    """A hospital's side of a deployed job: its own manifest, folds, image cache and state
    between rounds on its own disk (`job.SiteWork`); every message names the job, and one
    its recipe does not make is refused."""

    def __init__(self, work: SiteWork):
        self.work, self.arm = work, work.job.arm

    def greet(self, config) -> dict:
        """Who this site is; a coordinator that runs another job is refused, in words on the
        site's screen and log as well as in the error reply the coordinator records."""
        theirs, ours = str(config["job"]), self.work.digest()
        if theirs != ours:
            raise JobRefused(f"site {self.work.config.site} refuses the coordinator's job {theirs}: this site's "
                             f"recipe makes job {ours}; the arm, data settings, "
                             "protocol, seed or outcome differ. Take the coordinator's recipe and start again.")
        return {"site": self.work.config.site, "job": ours} | greeting_links(self.work.config.linkage_key,
                                                                              self.work.patients)

    def train(self, config, received):
        _check_job(self.work, str(config["job"]))
        sent, n, loss, accounting = self.work.train_round(str(config["job"]), str(config["fit"]), int(config["step"]),
                                              int(config["stage"]), int(config["round"]),
                                              str(config["trainable"]).split(","), received,
                                              float(config.get("proximal-mu", 0.0)), from_start_of(config))
        return sent, {"num-examples": int(n), "loss": float(loss), **accounting}

    def evaluate(self, config, received):
        _check_job(self.work, str(config["job"]))
        return None, self.work.evaluate(str(config["job"]), str(config["fit"]), received)


def make_client_app(site_files: list[str] | None = None):
    """The ClientApp of a job. In a deployment the site file is named by the node config
    (`stagewise-site`); in a simulation by the node's partition id among `site_files`."""

    def site_for(context, config) -> DiskSite:
        site_file = (site_files[int(context.node_config["partition-id"])] if site_files
                     else str(context.node_config[SITE_KEY]))
        return DiskSite(_site_work(site_file, str(config["arm"])))

    return client_app_over(site_for)


def _check_job(work: SiteWork, digest: str) -> None:
    if digest != work.digest():
        raise FederatedError(f"the coordinator asks for job {digest}; this site's recipe makes job {work.digest()}")


server_app = make_server_app()
client_app = make_client_app()

# -- the same job on one machine -----------------------------------------------------------


def simulate_job(job_dir: str | Path, site_files: list[str], threads_per_site: int = 1) -> dict:
    """Run the job in `job_dir` in Flower's simulation engine, one virtual SuperNode per
    site file: the rehearsal of a deployment, with the same numbers."""
    from flwr.simulation import run_simulation

    folder = JobDir(job_dir)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(make_server_app(folder.path), make_client_app([str(Path(f).resolve()) for f in site_files]),
                   num_supernodes=len(site_files), backend_config=simulation_backend(len(site_files), threads_per_site))
    status = json.loads((folder.fed / "status.json").read_text()) if (folder.fed / "status.json").is_file() else {}
    if status.get("state") != "finished":
        raise FederatedError(status.get("error") or "the simulated job did not finish")
    return json.loads((folder.path / "results.json").read_text())


__all__ = ["JobDir", "JobRefused", "RUN_DIR_ENV", "SITE_KEY", "client_app", "make_client_app", "make_server_app", "run_job",
           "server_app", "simulate_job", "summarize_job"]
