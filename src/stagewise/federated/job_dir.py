"""The run directory of a deployed job at the coordinator: the recipe, the job (`job.json`),
`federation/` (rounds, fits, the wire log, status, the admitted sites) and `model/`. Written by
the coordinator's command line (the job) and its ServerApp (everything else); read by
`federation export`. Imports no torch, so the command line starts the SuperLink promptly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stagewise.federated.job import FederatedError, FederatedJob
from stagewise.federated.round_store import RoundStore
from stagewise.io import atomic_write, strict_json
from stagewise.recipe import load_recipe

if TYPE_CHECKING:
    from stagewise.federated.rounds import FederatedResult

RUN_DIR_ENV = "STAGEWISE_FEDERATION_DIR"
"""Where the ServerApp finds its run directory: set by the coordinator in the SuperLink's
environment (inherited by the ServerApp process), so that no path is in the run config,
which Flower also gives to every site."""
SITE_KEY = "stagewise-site"
"""The node-config key naming a hospital's site file (node config never leaves the node)."""
JOB_FILE = "job.json"


class JobDir:
    """`<run>/recipe.yaml`, `job.json`, `federation/` (rounds, fits, wire log, status), `model/`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fed = self.path / "federation"

    def write_job(self, recipe_path: Path, arm: str, sites: int, cv: bool = True, final: bool = True,
                  connect_timeout: float = 600.0) -> FederatedJob:
        """Write (or, on a restart, check) the job: the recipe, the arm, how many sites take part."""
        job = FederatedJob.of(load_recipe(recipe_path), arm, cv, final)
        spec = {"recipe": "recipe.yaml", "arm": arm, "sites": sites, "cv": cv, "final": final, "digest": job.digest(),
                "connect_timeout": connect_timeout}
        if (self.path / JOB_FILE).is_file():
            old = json.loads((self.path / JOB_FILE).read_text())
            if any(old.get(k) != spec[k] for k in ("digest", "arm", "cv", "final")):
                raise FederatedError(f"{self.path} holds job {old.get('digest')} (arm {old.get('arm')}); this is job "
                                     f"{spec['digest']} (arm {arm}): use a new run directory")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / "recipe.yaml", recipe_path.read_text())
        atomic_write(self.path / JOB_FILE, json.dumps(spec, indent=1))
        return job

    def spec(self) -> dict:
        return json.loads((self.path / JOB_FILE).read_text())

    def admit(self, nodes: dict[int, str], fingerprints: dict[str, str]) -> None:
        """The job's list of admitted sites (`federation/admitted.json`), written by the
        coordinator once it registered their keys: site name, key fingerprint, node id. The
        ServerApp answers these nodes only."""
        sites = {name: {"key": fingerprints[name], "node": int(node)} for node, name in nodes.items()}
        self.fed.mkdir(parents=True, exist_ok=True)
        atomic_write(self.fed / "admitted.json", json.dumps({"sites": dict(sorted(sites.items()))}, indent=1))

    def admitted(self) -> dict[str, dict]:
        """Site name -> {"key", "node"} of the admitted sites; {} when no list was written
        (a simulation, or a test coordinator without keys)."""
        path = self.fed / "admitted.json"
        return json.loads(path.read_text())["sites"] if path.is_file() else {}

    def job(self) -> FederatedJob:
        spec = self.spec()
        return FederatedJob.of(load_recipe(self.path / spec["recipe"]), spec["arm"], spec["cv"], spec["final"])

    def fit_file(self, fit: str) -> Path:
        return self.fed / "fits" / f"{fit}.json"

    def checkpoint(self, fit: str, t: int, out: FederatedResult) -> None:
        """The server's state after round `t` of `fit`: aggregated tensors and the round log."""
        RoundStore(self.fed / "rounds" / fit).save(t, out.global_state, {"round": t, "rounds": out.rounds,
                                                                           "shared": out.shared})

    def last_checkpoint(self, fit: str, out: FederatedResult) -> int:
        """Load the latest finished round of `fit` into `out`; its number (0: none)."""
        found = RoundStore(self.fed / "rounds" / fit).latest(with_info=True)
        if found is None:
            return 0
        t, state, info = found
        out.global_state.update(state)
        out.rounds, out.shared = info["rounds"], info["shared"]
        return t

    def status(self, **fields) -> None:
        self.fed.mkdir(parents=True, exist_ok=True)
        atomic_write(self.fed / "status.json", strict_json(fields | {"time": time.strftime("%Y-%m-%dT%H:%M:%S")}))
