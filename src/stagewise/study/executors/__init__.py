"""Where a study's fits run.

`local` (the default) fits each (unit, fold) in this process, one after another, as it is
submitted. `ray` runs each as a task on a Ray cluster (`stagewise.study.executors.ray`, imported
only when chosen): the images go into the object store once, an arm's pretraining on source
manifests runs once as a task of its own, and every result comes back to this process,
which alone writes the run directory. A fold's numbers do not depend on the executor.

An executor is a context manager with `submit(unit, split)` and `join()`; it hands every
finished fit to the `on_done(unit, split, FoldOutput)` callback it was made with, in this
process. An error in a fit stops the run with that error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from stagewise.evaluation.splits import Split
    from stagewise.study.fitting import FoldOutput, Reporter, Study
    from stagewise.study.units import Unit

    FoldDone = Callable[[Unit, Split, FoldOutput], None]


class Executor(Protocol):
    def __enter__(self) -> "Executor": ...
    def __exit__(self, *exc) -> None: ...
    def submit(self, unit: "Unit", split: "Split") -> None: ...
    def join(self) -> None: ...


def open_executor(study: "Study", on_done: "FoldDone", reporter: "Reporter") -> Executor:
    """The executor the recipe's `compute.executor` names."""
    if study.recipe.compute.executor == "ray":
        from stagewise.study.executors.ray import RayExecutor

        return RayExecutor(study, on_done, reporter)
    from stagewise.study.executors.local import LocalExecutor

    return LocalExecutor(study, on_done)
