"""What every command shares: the two consoles (messages on stderr, results on stdout), the
live progress display of a study, the guard that prints a `StagewiseError` without a
traceback, and the root options (`--version`)."""

from __future__ import annotations

import errno

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from stagewise.errors import StagewiseError


def make_console(stderr: bool) -> Console:
    """A terminal's own width; in logs and pipes (and test runners) a wide one, so a message
    naming a long file path is not cut across lines at Rich's default 80 columns."""
    return Console(stderr=stderr, width=None if Console(stderr=stderr).is_terminal else 200)


console = make_console(stderr=True)
out = make_console(stderr=False)


def show_version(value: bool) -> None:
    if value:
        from stagewise.version import __version__

        print(f"stagewise {__version__}")
        raise typer.Exit()


def root(version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Staged transfer learning on small clinical imaging cohorts.

    Example: stagewise validate examples/covid-outcome.yaml && stagewise run examples/covid-outcome.yaml
    """


class RichReporter:
    """Progress over folds (all arms) and over the epochs of the current fold; the ETA is
    `EtaEstimator`'s (each unit's own seconds per epoch), shown in the `eta` field."""

    def __init__(self, progress: Progress):
        from stagewise.study.progress import EtaEstimator

        self.progress = progress
        self.folds = None
        self.epochs = None
        self.eta = EtaEstimator()

    def start(self, total_folds: int) -> None:
        self.trained = None
        self.folds = self.progress.add_task("folds", total=total_folds, eta="")
        self.epochs = self.progress.add_task("epochs", total=1, visible=False, eta="")

    def plan(self, trained_units: list[str], n_splits: int, stages: dict | None = None,
             share: dict | None = None) -> None:
        """Count (and time, for the ETA) only the folds that train a network."""
        self.trained = set(trained_units)
        self.eta.plan(stages or {u: [] for u in trained_units}, n_splits, share)
        self.progress.reset(self.folds, total=len(trained_units) * n_splits, description="folds trained")

    def fold_started(self, arm, split, n_epochs) -> None:
        self.eta.fold_started(arm)
        self.progress.update(self.folds, description=f"{arm} {split.name}")
        self.progress.reset(self.epochs, total=n_epochs, visible=True, description="  epoch")

    def epoch_done(self, stage, epoch, entry) -> None:
        self.eta.epoch_done(stage)
        self.progress.update(self.epochs, advance=1, description=f"  {stage} loss {entry['loss']:.3f}")
        if self.eta.timed:
            self.progress.update(self.folds, eta=self.eta.text())

    def fold_done(self, arm, split, metrics, resumed) -> None:
        if self.trained is not None and arm not in self.trained:
            return  # baseline scores and the clinical model train nothing
        self.eta.fold_done(arm, resumed)
        if resumed:  # not trained in this session: it counts, but leaves the ETA to the folds trained now
            self.progress.update(self.folds, total=next(t.total for t in self.progress.tasks if t.id == self.folds) - 1)
        else:
            self.progress.advance(self.folds)
        if self.eta.timed:
            self.progress.update(self.folds, eta=self.eta.text())
        if resumed:
            self.progress.console.print(f"[dim]{arm} {split.name}: finished earlier, read back[/dim]")

    def message(self, text: str) -> None:
        """A line above the bars (a speed note, the steps after training, the Ray executor's fits)."""
        self.progress.console.print(f"[dim]{escape(text)}[/dim]", highlight=False)


def known_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: printed without a traceback. Every error
    stagewise raises for bad input derives from `StagewiseError`; a floating-point error is
    a diverged training (its message names the stage)."""
    return (StagewiseError, FloatingPointError)


STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""A full disk, a quota, a read-only or forbidden folder: the file and the reason are the whole story."""


def guard(fn, *args):
    """`fn(*args)`; a known error is printed (no traceback) and exits with status 2, as is a
    file that cannot be written for a full disk or a read-only folder wherever it happens."""
    try:
        return fn(*args)
    except known_errors() as err:
        console.print(f"[bold red]error:[/bold red] {escape(str(err))}")
        raise typer.Exit(2)
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        console.print(f"[bold red]error:[/bold red] {escape(where)}{escape(err.strerror or str(err))}. Free space, or "
                      "choose a folder you can write (e.g. another output directory)")
        raise typer.Exit(2)


PIXELS_HELP = ("most pixels (rows x columns x frames) an image may declare before it is decoded; default 134217728 "
               "(also the environment variable STAGEWISE_MAX_IMAGE_PIXELS)")


def set_max_image_pixels(value: int | None) -> None:
    """`--max-image-pixels`: the readers' pixel limit for this process and those it starts,
    through the environment variable they read (`data.reader_base.max_image_pixels`)."""
    import os

    from stagewise.data.reader_base import MAX_PIXELS_ENV

    if value is None:
        return
    if value < 1:
        console.print("[bold red]error:[/bold red] --max-image-pixels must be a positive number of pixels")
        raise typer.Exit(2)
    os.environ[MAX_PIXELS_ENV] = str(value)
