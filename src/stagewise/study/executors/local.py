"""The default executor: every fit in this process, in submission order, as it is submitted."""

from __future__ import annotations

import contextlib

from stagewise.study.fitting import fit_fold


class LocalExecutor:
    def __init__(self, study, on_done):
        self.study, self.on_done = study, on_done
        self.session = contextlib.ExitStack()

    def __enter__(self) -> "LocalExecutor":
        if any(arm.sites.mode == "federated" for arm in self.study.recipe.arms):
            # every federated fold's Flower simulation on one Ray instance, started once
            from stagewise.federated.simulation_session import one_ray_instance

            self.session.enter_context(one_ray_instance())
        return self

    def __exit__(self, *exc) -> None:
        self.session.close()

    def submit(self, unit, split) -> None:
        self.on_done(unit, split, fit_fold(self.study, unit, split))

    def join(self) -> None:
        pass
