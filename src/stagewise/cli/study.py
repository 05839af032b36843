"""The study commands: `run`, `validate`, `demo`, `report`, and `backbones` (the sources a
recipe's arms can name)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from stagewise.cli.console import RichReporter, console, guard, out
from stagewise.errors import RunError
from stagewise.text import counted


def metrics_table(metrics: dict) -> Table:
    table = Table(title=f"{metrics['recipe']}: {metrics['n_splits']} folds per arm, mean ± sd")
    table.add_column("arm")
    table.add_column("backbone")
    table.add_column("stages")
    columns = {"auroc": "AUROC", "balanced_accuracy": "balanced acc.", "f1": "F1",
               "sensitivity": "sens.", "specificity": "spec."}  # PPV, NPV, AUPRC, counts: report
    for m in columns.values():
        table.add_column(m, justify="right")
    for name, arm in metrics["arms"].items():
        s = arm["summary"]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" if k in s else "-" for k in columns]
        table.add_row(name, arm["backbone"], " -> ".join(arm["stages"]), *cells)
    return table


def _run_recipe(recipe, out_dir: Path) -> None:
    from stagewise.study import run_study
    from stagewise.study.progress import LineReporter

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[eta]}")]  # EtaEstimator's: each unit's own seconds per epoch
    try:
        if console.is_terminal:
            with Progress(*columns, console=console, transient=False) as progress:
                result = run_study(recipe, out_dir, RichReporter(progress))
        else:  # a pipe, a log file, a batch job: plain lines (fold done, metrics, ETA)
            result = run_study(recipe, out_dir, LineReporter())
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted.[/yellow] Finished folds are saved in {out_dir}; run the same command to resume.")
        raise typer.Exit(130)
    out.print(metrics_table(result.metrics))
    out.print(f"run directory: {result.run_dir}")
    if (result.run_dir / "report.html").is_file():
        out.print(f"report: {result.run_dir / 'report.html'}")


def run(
    recipe: Path = typer.Argument(..., help="the study's YAML recipe"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="run directory (default: runs/<recipe name>)"),
    overrides: list[str] = typer.Option([], "--set", help="change a field: --set protocol.repeats=1 (repeatable)"),
    executor: str = typer.Option(None, "--executor", help="local (default: one process) or ray (a task per fit); "
                                 "sets compute.executor"),
    address: str = typer.Option(None, "--address", help="the Ray cluster to join: auto or HOST:PORT (implies "
                                "--executor ray; none starts Ray on this machine); sets compute.address"),
) -> None:
    """Run a study; running it again resumes and skips finished folds.

    Example: stagewise run recipe.yaml --executor ray --address auto
    """
    from stagewise.study.preflight import missing_manifest_hint
    from stagewise.recipe import RecipeError, load_recipe

    def go():
        if executor not in (None, "local", "ray"):
            raise RecipeError(f"--executor {executor!r}: choose local or ray")
        if address is not None and executor == "local":
            raise RecipeError("--address is the Ray cluster to join: it goes with --executor ray, not local")
        extra = []
        if executor is not None or address is not None:
            extra.append(f"compute.executor={executor or 'ray'}")
        if address is not None or executor == "local":
            extra.append(f"compute.address={json.dumps(address)}")  # quoted: HOST:PORT stays a string
        r = load_recipe(recipe, [*overrides, *extra])
        hint = missing_manifest_hint(recipe, r.cohort.manifest)
        if hint:
            raise RunError(hint.replace("then validate again", "then run again"))
        _run_recipe(r, out_dir or Path("runs") / r.name)

    guard(go)


def validate(
    recipe: Path = typer.Argument(..., help="the study's YAML recipe"),
    overrides: list[str] = typer.Option([], "--set", help="check the recipe as `run --set` would change it"),
) -> None:
    """Everything `run` checks before training, without training: the recipe, every manifest
    row, every image decoded, each arm's architecture and stages, source manifests, folds.

    Example: stagewise validate examples/covid-outcome.yaml --set protocol.repeats=1
    """
    from stagewise.study.preflight import check_study, cohort_alone_problems, missing_manifest_hint
    from stagewise.recipe import RecipeError, load_recipe, read_recipe_data

    def go():
        try:
            r = load_recipe(recipe, overrides)
        except RecipeError as err:  # the cohort's problems too, not only once the recipe is fixed
            data = read_recipe_data(recipe, overrides)
            cohort = cohort_alone_problems(data, recipe.parent.resolve())
            if not cohort:
                raise
            raise RecipeError(f"{err}\nand the cohort, checked on its own:\n" + "\n".join(cohort)) from None
        hint = missing_manifest_hint(recipe, r.cohort.manifest)
        if hint:
            raise RunError(hint)
        cohort = check_study(r, source=str(recipe))
        for warning in cohort.warnings:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        s = cohort.summary()
        out.print(f"{recipe}: valid. {counted(len(r.arms), 'arm')}; cohort of {s['images']} images from {s['patients']} patients, "
                  f"{s['positive_patients']} positive ({s['prevalence_patients']:.1%}).")

    guard(go)


def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory")) -> None:
    """An offline three-arm study on scikit-learn's digits (real scans): a hard pair at low
    resolution with few labelled patients, a tiny CNN from scratch against pretrained on the
    other digits, then probed, then thawed.

    Example: stagewise demo --out runs/demo 2>&1 | tee demo.log
    """
    from stagewise.study.demo import demo_recipe, make_demo_study

    def go():
        _run_recipe(demo_recipe(*make_demo_study(out_dir / "cohort")), out_dir)

    guard(go)


def report(run_dir: Path = typer.Argument(..., help="a finished run directory")) -> None:
    """Write RUN_DIR/report.html: one self-contained file that opens offline.

    Example: stagewise report runs/covid-outcome-icu
    """
    from stagewise.report.html import write_report

    def go():
        if not (run_dir / "metrics.json").is_file():
            raise RunError(f"{run_dir}: no metrics.json; run the study (stagewise run) to the end first")
        out.print(f"report: {write_report(run_dir)}")

    guard(go)


def backbones() -> None:
    """List the backbone sources a recipe can name (every source in the registry).

    Example: stagewise backbones
    """
    from stagewise.models import describe_sources

    table = Table("spec", "what it is")
    for spec, what in describe_sources():
        table.add_row(escape(spec), escape(what))  # '[#<arm>]' is text, not a style
    out.print(table)
