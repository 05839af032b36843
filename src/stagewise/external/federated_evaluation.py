"""The Python API of a federated evaluation of one bundle (`stagewise federation evaluate`):
one exported bundle validated at several hospitals at once, no patient data moving.

- `plan_evaluation`: the coordinator's folder and what is evaluated (evaluation.json: the
  bundle's digest and facts, the bins, the bootstrap, how many sites).
- `evaluate_across_sites`: the whole evaluation on one machine in Flower's simulation engine,
  one virtual site per manifest (a rehearsal, or a consortium's own pooled check).
- `coordinate_evaluation`: the coordinator of a deployment (TLS, admitted site keys), each
  hospital joining with `run_evaluation_site` (`stagewise federation evaluate-site`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import json

from stagewise.bundle import VALIDATION_FILE, Bundle
from stagewise.evaluation.binned import DEFAULT_BINS, score_edges
from stagewise.external.federated_app import simulate_evaluation
from stagewise.external.federated_results import EvaluationDir
from stagewise.external.options import ExternalOptions
from stagewise.external.site_summary import bundle_digest, prepare_site
from stagewise.federated.launch import Coordinator, run_site
from stagewise.federated.rounds import FederatedError

APPS = ("stagewise.external.federated_app:server_app", "stagewise.external.federated_app:client_app")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def plan_evaluation(bundle_dir: str | Path, out_dir: str | Path, sites: int, bins: int = DEFAULT_BINS,
                    bootstrap: int = 2000, seed: int = 0, connect_timeout: float = 600.0,
                    timeout: float = 3600.0) -> EvaluationDir:
    """Write the coordinator's evaluation.json for `bundle_dir` (loaded and checked whole)."""
    if bootstrap < 0 or sites < 1:
        raise FederatedError(f"bootstrap {bootstrap}, sites {sites}: give bootstrap >= 0 and at least one site")
    bundle = Bundle.load(bundle_dir)
    task = bundle.info["tasks"][0]
    facts = {"recipe": bundle.info["recipe"], "arm": task["arm"], "output": task["output"],
             "outcome": task["outcome"], "threshold": float(task["threshold"]), "backbone": bundle.info["backbone"],
             "image_size": bundle.info["image_size"], "digest": bundle_digest(bundle.info)}
    oof = ((_read_json(Path(bundle_dir) / VALIDATION_FILE).get("outputs") or {}).get(task["output"]) or {})
    edges = score_edges(bins, oof.get("probability"))
    folder = EvaluationDir(out_dir)
    folder.write_spec({"bundle_digest": facts["digest"], "bundle": facts, "sites": int(sites), "bins": int(bins), "edges": edges.tolist(),
                       "edges_from_development_scores": bool(len(edges) > int(bins) + 1),
                       "bootstrap": int(bootstrap), "seed": int(seed), "connect_timeout": float(connect_timeout),
                       "timeout": float(timeout)})
    return folder


def evaluate_across_sites(bundle_dir: str | Path, manifests: dict[str, str | Path], out_dir: str | Path,
                          options: ExternalOptions | None = None, bins: int = DEFAULT_BINS, bootstrap: int = 2000,
                          seed: int = 0, on_message=None) -> dict:
    """Every site's manifest checked (all problems, by CSV line), then the evaluation in
    Flower's simulation engine; returns results.json's content. The sites' files (which name
    their manifests) live in a temporary folder, never in `out_dir`."""
    plan_evaluation(bundle_dir, out_dir, len(manifests), bins, bootstrap, seed, connect_timeout=300.0)
    with tempfile.TemporaryDirectory(prefix="stagewise-sites-") as tmp:
        files = [prepare_site(bundle_dir, manifest, site, Path(tmp) / site, options)
                 for site, manifest in manifests.items()]
        return simulate_evaluation(out_dir, files, on_message)


def coordinate_evaluation(folder: EvaluationDir, certs: Path | None, site_keys: list[Path], host: str = "127.0.0.1",
                          port: int = 9093, timeout: float = 7 * 24 * 3600.0, on_started=None) -> dict:
    """Run a planned evaluation as the coordinator of a deployment: a Flower SuperLink with
    TLS admitting the listed site keys only; returns results.json's content."""
    coordinator = Coordinator(folder.path, certs, host=host, port=port, site_keys=list(site_keys), apps=APPS)
    try:
        coordinator.start()
        if on_started is not None:
            on_started(coordinator)
        status = coordinator.wait(coordinator.submit(), timeout)
    finally:
        coordinator.stop()
    if status["state"] != "finished":
        raise FederatedError(f"the federated evaluation failed: {status.get('error', '?')}")
    return folder.results()


def run_evaluation_site(site_file: Path, server: str, ca: Path | None, key: Path | None, port: int, log: Path,
                        wait: float = 3600.0, on_retry=None) -> int:
    """A hospital's SuperNode answering the evaluation with its prepared site file; its exit code."""
    return run_site(site_file, server, ca, key, port, log, wait, on_retry=on_retry, client_app=APPS[1])


__all__ = ["APPS", "coordinate_evaluation", "evaluate_across_sites", "plan_evaluation", "prepare_site",
           "run_evaluation_site"]
