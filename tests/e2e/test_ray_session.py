"""A study's federated folds share one private Ray instance and one set of site workers,
which end with the run."""

import os
import time
from pathlib import Path

import pytest

from conftest import free_port, small_recipe
from stagewise.study import run_study

pytestmark = pytest.mark.ray_of_its_own  # starts Ray itself: the tests' shared instance is stopped first (conftest)

QUIET = {"saliency": 0, "bootstrap": 50, "report": False}


def _site_workers() -> set[int]:
    """The process ids of Flower's site workers under this process's Ray (Ray names their
    processes after the actor class; another test process may run a Ray of its own)."""
    parents, workers = {}, set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if (d / "cmdline").read_bytes().startswith(b"ray::ClientAppActor"):
                workers.add(int(d.name))
        except (OSError, IndexError, ValueError):
            continue

    def mine(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parents.get(pid, 0)
        return False

    return {w for w in workers if mine(w)}


def test_a_studys_federated_folds_share_one_ray_instance_and_its_site_workers_until_the_run_ends(sites_manifest,
                                                                                                   tmp_path, monkeypatch):
    """Flower's engine would start and stop Ray and new worker processes for every fold's
    simulation; the study keeps one private instance and its workers for all of them and
    stops them when the run ends. The instance is its own even where RAY_ADDRESS names another
    cluster (here one that does not exist: joining it would fail)."""
    import ray

    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")

    from stagewise.study import SilentReporter

    class Watch(SilentReporter):
        nodes: list = []
        workers: list = []

        def fold_done(self, arm, split, metrics, resumed):
            self.nodes.append(ray.get_runtime_context().get_node_id() if ray.is_initialized() else None)
            self.workers.append(_site_workers())

    arms = [{"name": "fed", "backbone": "scratch:tinycnn", "sites": {"mode": "federated"},
             "stages": [{"kind": "probe", "rounds": 1, "epochs": 1, "batch_size": 16}]}]
    recipe = small_recipe(sites_manifest, arms, protocol={"folds": 2}, evaluation=QUIET,
                          cohort={"manifest": str(sites_manifest), "site": "hospital"})
    watch = Watch()
    run_study(recipe, tmp_path / "run", watch)
    assert len(watch.nodes) == 2 and watch.nodes[0] is not None and watch.nodes[0] == watch.nodes[1]
    assert watch.workers[0] and watch.workers[0] == watch.workers[1]  # the second fold's sites ran in the same processes
    assert not ray.is_initialized()
    deadline = time.monotonic() + 20  # the workers are stopped with Ray; their processes exit soon after
    while _site_workers() & watch.workers[0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _site_workers() & watch.workers[0]
