"""The bundle commands: `export` (a run's arm -> a deployable bundle) and `predict` (a
bundle's scores for image files, on the CPU)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.console import PIXELS_HELP, console, guard, out, set_max_image_pixels
from stagewise.errors import RunError


def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    arm: list[str] = typer.Option(..., "--arm", "-a", help="a model arm; repeat for arms sharing one frozen backbone"),
    fold: str = typer.Option(None, "--fold", help="a saved fold model, e.g. r0-f0 (needs compute.save_models)"),
    refit: bool = typer.Option(False, "--refit", help="train the arm on every image instead"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="bundle folder (default: RUN_DIR/bundles/ARM)"),
) -> None:
    """Write a deployable bundle: safetensors + ONNX, preprocessing, threshold, model card.

    Example: stagewise export runs/covid-outcome-icu --arm probe-thaw --refit

    A deployed federated job's model (`federation coordinate`): `stagewise federation export`.
    """
    from stagewise.bundle import export_bundle

    target = out_dir or run_dir / "bundles" / "+".join(arm)
    guard(lambda: out.print(f"bundle: {export_bundle(run_dir, arm, target, fold, refit)}"))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz")


def _image_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the image files in it (sorted, not recursive)."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
        else:
            files.append(p)
    return files


def predict_cmd(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    images: list[Path] = typer.Argument(..., help="PNG, JPEG, DICOM or NIfTI files, or folders of them"),
    engine: str = typer.Option("torch", help="torch or onnx"),
    csv: Path = typer.Option(None, help="also write the table to this CSV file"),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", help=PIXELS_HELP),
) -> None:
    """Per-image probability and decision, on the CPU. Files that cannot be scored are named
    with the reason, the others are scored, and the exit status is 1.

    Example: stagewise predict runs/covid-outcome-icu/bundles/probe-thaw scans/ --csv scores.csv
    """
    from stagewise.bundle import Bundle
    from stagewise.io import atomic_write_with, check_writable

    set_max_image_pixels(max_image_pixels)

    def go():
        files = _image_files(images)
        if not files:
            raise RunError(f"no image files in {', '.join(map(str, images))} (looked for {', '.join(IMAGE_SUFFIXES)})")
        if csv:  # before any scoring: a CSV that cannot be written is said at once
            check_writable(csv.parent)
        loaded = Bundle.load(bundle)
        for notice in loaded.notices:
            console.print(f"[yellow]note:[/yellow] {escape(notice)}")
        table = loaded.predict(files, engine=engine)
        scored = table[table["error"].isna()].drop(columns="error")
        view = Table(*scored.columns)
        for row in scored.itertuples(index=False):
            view.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
        out.print(view)
        if csv:
            atomic_write_with(csv, lambda path: table.to_csv(path, index=False))
        failed = table[table["error"].notna()]
        for file, reason in zip(failed["image"], failed["error"]):
            console.print(f"[bold red]not scored:[/bold red] {escape(file)}: {escape(reason)}")
        return len(failed)

    if guard(go):
        raise typer.Exit(1)
