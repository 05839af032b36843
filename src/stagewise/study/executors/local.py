"""The default executor: every fit in this process, in submission order, as it is submitted."""

from __future__ import annotations

from stagewise.fitting import fit_fold


class LocalExecutor:
    def __init__(self, study, on_done):
        self.study, self.on_done = study, on_done

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, unit, split) -> None:
        self.on_done(unit, split, fit_fold(self.study, unit, split))

    def join(self) -> None:
        pass
