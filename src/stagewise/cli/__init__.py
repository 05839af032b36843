"""The command line: `stagewise run RECIPE`, `stagewise demo`, `stagewise validate`, ...

This module only assembles the app from one module per command group, registering the
commands in the order `stagewise --help` lists them:

- `console`: the consoles, the progress display, the error guard, `--version`;
- `study`: run, validate, demo, report, backbones;
- `bundle`: export, predict;
- `external`: evaluate;
- `serve`: serve;
- `federation_app`: the `federation` sub-app (certs, key, coordinate, site);
- `federation_evaluate`: its `evaluate` and `evaluate-site` (one bundle validated at several hospitals).

Each command imports what it needs (torch, the study, Flower) when it runs, so
`stagewise --help` stays fast.
"""

from __future__ import annotations

import typer

from stagewise.cli import bundle, external, federation_evaluate, serve, study  # noqa: F401 - registers its commands
from stagewise.cli.bundle import IMAGE_SUFFIXES
from stagewise.cli.console import RichReporter, root
from stagewise.cli.federation_app import federation
from stagewise.cli.study import metrics_table

__all__ = ["app", "federation", "main", "IMAGE_SUFFIXES", "RichReporter", "metrics_table"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Staged transfer learning on small clinical imaging cohorts.")
app.callback()(root)
app.command()(study.run)
app.command()(study.validate)
app.command()(study.demo)
app.command()(study.report)
app.command()(bundle.export)
app.command(name="predict")(bundle.predict_cmd)
app.command()(external.evaluate)
app.command()(serve.serve)
app.command()(study.backbones)
app.add_typer(federation, name="federation")


def main() -> None:
    app()
