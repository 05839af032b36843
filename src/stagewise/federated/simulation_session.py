"""Many Flower simulations on one Ray instance and one set of site workers.

Flower's simulation engine starts Ray when none runs, makes a pool of worker processes (Ray
actors) for the virtual sites, and at the end of every run terminates the pool and shuts Ray
down. A study runs one simulation per federated fold, so each fold would pay Ray's start and
stop (measured 6.6 s on an idle 2-core machine) and new worker processes that import torch,
Flower and stagewise again before the first round can start (measured 10-20 s of a 2-round
tiny-model simulation under a load of 5, against 0.2 s for each later round).

Inside `one_ray_instance` both are kept: Ray is started once, and the worker processes of
one simulation serve the next. Nothing of a site's data or model stays in a worker between
messages: Flower sends each worker the ClientApp (with the site's rows) and the site's
`Context` with every message and takes the updated `Context` back, so a kept worker holds
only imported modules. The pool is swapped in for Flower's own (`BasicActorPool`, the name
its Ray backend module looks up; flwr is pinned) and only for the block.
"""

from __future__ import annotations

import contextlib
import os
import sys

from stagewise.federated.simulation import simulation_backend
from stagewise.training.compute import usable_cpus

__all__ = ["one_ray_instance"]


class _RayWithoutShutdown:
    """The `ray` module as Flower's Ray backend sees it inside `one_ray_instance`: everything
    but `shutdown`, which the block does once at its end."""

    def __init__(self, ray):
        self._ray = ray

    def __getattr__(self, name):
        return getattr(self._ray, name)

    def shutdown(self, *args, **kwargs) -> None:
        pass


def _kept_pool_class(base, kept: dict):
    """Flower's `BasicActorPool` whose idle workers outlive the simulation: `kept` maps the
    workers' resources to the idle workers the last simulation with those resources left."""

    class KeptActorPool(base):
        keeps_workers = True

        def __init__(self, actor_type, client_resources, actor_kwargs):
            super().__init__(actor_type, client_resources, actor_kwargs)
            self.key = (actor_type, tuple(sorted(client_resources.items())), tuple(sorted(actor_kwargs.items())))
            for key in [k for k in kept if k != self.key]:  # workers of other sizes hold CPUs these need
                _kill(kept.pop(key))
            self.pool = kept.pop(self.key, [])
            self.num_actors = len(self.pool)

        def add_actors_to_pool(self, num_actors: int) -> None:
            """Flower asks for a full pool when it builds one: only the missing workers are made."""
            super().add_actors_to_pool(max(0, num_actors - self.num_actors))

        def terminate_all_actors(self) -> None:
            """At the end of a simulation: the idle workers wait for the next one. A worker
            still busy with a message that timed out is left out and ends with its handle."""
            kept.setdefault(self.key, []).extend(self.pool)
            self.pool = []

    return KeptActorPool


def _kill(workers: list) -> None:
    import ray

    for worker in workers:
        ray.kill(worker)


@contextlib.contextmanager
def one_ray_instance(threads_per_site: int = 1):
    """Run every Flower simulation inside the block on one private Ray instance and one set of
    site workers (see the module's docstring). Ray is started when none runs yet and stopped
    at the end; the kept workers are terminated at the end in any case. A block inside
    another changes nothing: the outer one's Ray and workers serve it. Used by a study's
    local executor around its fits."""
    import ray
    from flwr.server.superlink.fleet.vce.backend import raybackend

    if getattr(raybackend.BasicActorPool, "keeps_workers", False):  # inside another block: its Ray and workers serve
        yield
        return
    started = not ray.is_initialized()
    if started:
        init = simulation_backend(usable_cpus(), threads_per_site)["init_args"]
        pythonpath = os.pathsep.join(sys.path)  # as Flower's own start passes the driver's path on
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init)
    kept: dict = {}
    real_ray, real_pool = raybackend.ray, raybackend.BasicActorPool
    raybackend.ray, raybackend.BasicActorPool = _RayWithoutShutdown(ray), _kept_pool_class(real_pool, kept)
    try:
        yield
    finally:
        raybackend.ray, raybackend.BasicActorPool = real_ray, real_pool
        for workers in kept.values():
            _kill(workers)
        if started:
            ray.shutdown()
