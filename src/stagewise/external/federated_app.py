"""A federated evaluation of one bundle over Flower: the coordinator's ServerApp asks every
admitted site once, each site's ClientApp scores its own manifest with its own copy of the
bundle (`site_summary`) and answers with aggregates only; the coordinator pools them
(`federated_results`).

The same two apps run in Flower's simulation engine (`simulate_evaluation`, one machine: the
rehearsal and the tests) and in a deployment (`stagewise federation evaluate` and
`evaluate-site`): the coordinator's SuperLink and a hospital's SuperNode are started by
`federated.launch` exactly as for a training job, with this module's components.

One message each way per site. Down: the bundle's digest (a site holding another bundle
refuses), the bins' edges (fixed by the coordinator), the bootstrap resamples and seed. Up: the site's name
(ConfigRecord), its scalar figures (MetricRecord) and two summable arrays, `histograms`
(2 x bins) and `sums` (ArrayRecord). A site that cannot evaluate answers with its name and
the kind of error only (ConfigRecord `failed`): the full message, which names its manifest
and rows, stays on the site's screen and log.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

from stagewise.external.federated_results import EvaluationDir, pool_sites, write_results
from stagewise.external.site_summary import EvaluationSite, summarize_site
from stagewise.federated.job_dir import RUN_DIR_ENV, SITE_KEY, JobDir
from stagewise.federated.wire import WireLog
from stagewise.federated.polling import PromptGrid
from stagewise.federated.rounds import AdmittedGrid, AuditedGrid, FederatedError, wait_for_sites

log = logging.getLogger("stagewise")


def _tee(*hooks):
    def call(direction, message):
        for hook in hooks:
            if hook is not None:
                hook(direction, message)
    return call


def run_evaluation(grid, folder: EvaluationDir, on_message=None) -> dict:
    """Ask every admitted site for its aggregates; pool them; write results.json and the report."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    spec = folder.spec()
    wire = AuditedGrid(PromptGrid(grid), _tee(WireLog(folder.fed / "wire.jsonl"), on_message))
    admitted = {site["node"] for site in JobDir(folder.path).admitted().values()}
    asked = AdmittedGrid(wire, admitted) if admitted else wire
    n = int(spec["sites"])
    ids = wait_for_sites(asked, n, float(spec.get("connect_timeout", 600.0)))
    config = {"bundle": spec["bundle_digest"], "edges": [float(e) for e in spec["edges"]], "bootstrap": int(spec["bootstrap"]),
              "seed": int(spec["seed"])}
    messages = [Message(RecordDict({"config": ConfigRecord(config)}), message_type=MessageType.EVALUATE,
                        dst_node_id=node) for node in ids]
    sites, failures = {}, {}
    for reply in asked.send_and_receive(messages, timeout=float(spec.get("timeout", 3600.0))):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            failures[f"node {node}"] = str(reply.error.reason)[:300]
            continue
        name = str(reply.content["config"]["site"])
        if "failed" in reply.content["config"]:
            failures[name] = str(reply.content["config"]["failed"])[:300]
            continue
        if name in sites or name in failures:
            raise FederatedError(f"two sites answered as {name}: give each hospital its own --site name")
        arrays = reply.content["aggregates"]
        sites[name] = {"figures": dict(reply.content["figures"].items()),
                       "histograms": arrays["histograms"].numpy(), "sums": arrays["sums"].numpy()}
    answered = len(sites) + len(failures)
    if answered < len(ids):
        failures["timeout"] = f"{len(ids) - answered} site(s) did not answer within {spec.get('timeout')} s"
    if not sites:
        raise FederatedError("no site answered with its figures: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    results = pool_sites(spec, sites, failures)
    write_results(folder, results)
    return results


def make_server_app(folder: str | Path | None = None, on_message=None):
    """The ServerApp; `folder` defaults to the run directory the coordinator names in the
    process environment (as a training job's)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        target = EvaluationDir(folder or os.environ[RUN_DIR_ENV])
        logging.getLogger("flwr").setLevel(logging.ERROR)
        run = str(context.run_id)
        target.status(state="running", run=run)
        try:
            run_evaluation(grid, target, on_message)
        except BaseException as err:
            target.status(state="failed", run=run, error=f"{type(err).__name__}: {err}")
            raise
        target.status(state="finished", run=run)

    return app


def answer(site_file: str, config) -> tuple[dict | None, dict, str, str | None]:
    """A site's answer: (summable arrays, scalar figures, site name, None), or, when it could
    not evaluate, (None, {}, site name, what the coordinator is told: the kind of error only).
    The full error, which names the site's manifest and rows, is logged here."""
    site = EvaluationSite.load(site_file)
    try:
        arrays, figures = summarize_site(site, [float(e) for e in config["edges"]], int(config["bootstrap"]),
                                         int(config["seed"]), expected_digest=str(config["bundle"]))
    except Exception as err:  # noqa: BLE001 - the text names local files and rows: it stays here
        log.error("stagewise site: the federated evaluation failed here: %s", err)
        print(f"stagewise site: the federated evaluation failed here: {err}", flush=True)
        return None, {}, site.site, (f"the site could not evaluate the bundle ({type(err).__name__}); its own screen "
                                     "and log say why")
    return arrays, figures, site.site, None


def make_client_app(site_files: list[str] | None = None):
    """The ClientApp: the site file is named by the node config (`stagewise-site`) in a
    deployment, by the node's partition id among `site_files` in a simulation."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.evaluate()
    def evaluate(msg, context):
        site_file = (site_files[int(context.node_config["partition-id"])] if site_files
                     else str(context.node_config[SITE_KEY]))
        arrays, figures, name, failed = answer(site_file, msg.content["config"])
        if failed:
            return Message(RecordDict({"config": ConfigRecord({"site": name, "failed": failed})}), reply_to=msg)
        record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items()))
        return Message(RecordDict({"config": ConfigRecord({"site": name}), "figures": MetricRecord(figures),
                                   "aggregates": record}), reply_to=msg)

    return app


server_app = make_server_app()
client_app = make_client_app()


def simulate_evaluation(folder: str | Path, site_files: list[str | Path], on_message=None) -> dict:
    """Run the evaluation of `folder` (its evaluation.json written) in Flower's simulation
    engine, one virtual SuperNode per prepared site file; returns results.json's content."""
    from flwr.simulation import run_simulation

    from stagewise.federated.simulation import simulation_backend

    target = EvaluationDir(folder)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(make_server_app(target.path, on_message), make_client_app([str(Path(f).resolve()) for f in site_files]),
                   num_supernodes=len(site_files), backend_config=simulation_backend(len(site_files), 1))
    status = target.read_status()
    if status.get("state") != "finished":
        raise FederatedError(status.get("error") or "the simulated evaluation did not finish")
    return target.results()


__all__ = ["client_app", "make_client_app", "make_server_app", "run_evaluation", "server_app",
           "simulate_evaluation"]
