"""`evaluate`: external validation of a bundle on another site's labelled cohort."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from stagewise.cli.console import PIXELS_HELP, guard, out, set_max_image_pixels


def evaluate(
    bundle: Path = typer.Argument(..., help="a bundle folder made by `stagewise export`"),
    manifest: Path = typer.Argument(..., help="the cohort to evaluate (another site's): a CSV manifest, one row per image, with outcome and patient"),
    out_dir: Path = typer.Option(None, "--out", "-o", help="output folder (default: evaluations/<manifest name>)"),
    image: str = typer.Option(None, help="image path column (default: the bundle recipe's)"),
    outcome: str = typer.Option(None, help="outcome column (default: the outcome the bundle predicts)"),
    patient: str = typer.Option(None, help="patient id column (default: the bundle recipe's)"),
    site: str = typer.Option(None, help="site column, for per-site figures (default: the bundle recipe's, if present); "
                             "it may group one patient's images under several values, e.g. a view column"),
    subgroup: list[str] = typer.Option([], "--subgroup", help="a column to break the figures down by (repeatable): "
                                       "COLUMN, or COLUMN:CUT,CUT for numeric bands, e.g. age:40,65 (default: the "
                                       "bundle recipe's cohort.subgroups the manifest has)"),
    positive: list[str] = typer.Option([], "--positive", help="an outcome value read as positive (repeatable)"),
    negative: list[str] = typer.Option([], "--negative", help="an outcome value read as negative (repeatable)"),
    root: Path = typer.Option(None, help="folder relative image paths start from (default: the manifest's)"),
    drop_missing_outcome: bool = typer.Option(False, "--drop-missing-outcome", help="leave out rows without an outcome"),
    output: str = typer.Option(None, help="which bundle output to validate (default: the first)"),
    images: str = typer.Option(None, "--images", help="first or all: images scored per patient (default: the bundle's protocol)"),
    aggregate: str = typer.Option(None, help="mean, max or first: image scores -> patient score (default: the bundle's)"),
    recalibrate: str = typer.Option(None, help="intercept or slope: fit a logistic recalibration on part of the cohort, "
                                    "evaluate it on the rest, save a recalibrated bundle"),
    fit_fraction: float = typer.Option(0.5, "--fit-fraction", help="share of patients the recalibration is fitted on"),
    seed: int = typer.Option(0, help="seed of the bootstrap and of the recalibration split"),
    bootstrap: int = typer.Option(2000, help="bootstrap resamples of patients for the 95 % CIs (0: none)"),
    engine: str = typer.Option("torch", help="torch or onnx"),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", help=PIXELS_HELP),
) -> None:
    """External validation: the bundle on another site's labelled cohort, against its own
    cross-validated figures; an HTML report with the TRIPOD+AI items, per-image and
    per-patient predictions, optional recalibration. The cohort is first compared with the
    bundle's training set (same pixels, near-duplicate images, patient ids): when they overlap,
    the evaluation says it is not external and scores with and without the overlapping patients.

    Example: stagewise evaluate bundles/probe site-b.csv --outcome icu --positive yes --negative no -o eval-site-b
    """
    from stagewise.external import ExternalOptions, evaluate_bundle
    from stagewise.external.outputs import default_folder

    set_max_image_pixels(max_image_pixels)

    def go():
        options = ExternalOptions(image=image, outcome=outcome, patient=patient, site=site, positive=positive,
                                  negative=negative, root=root, drop_missing_outcome=drop_missing_outcome, output=output,
                                  test_images=images, aggregate=aggregate, recalibrate=recalibrate,
                                  fit_fraction=fit_fraction, seed=seed, bootstrap=bootstrap, subgroups=subgroup)
        target = out_dir or default_folder(manifest)
        if out_dir is None and target != Path("evaluations") / manifest.stem:
            out.print(f"[yellow]note:[/yellow] {escape(str(Path('evaluations') / manifest.stem))} holds an earlier "
                      f"evaluation of another manifest named {escape(manifest.name)}; this one goes to "
                      f"{escape(str(target))}")
        res = evaluate_bundle(bundle, manifest, target, options, engine)
        for key in ("integrity_notice", "intensity_notice"):
            if res["bundle"].get(key):
                out.print(f"[yellow]note:[/yellow] {escape(res['bundle'][key])}")
        overlap = res["overlap"]
        word = "external" if overlap["external"] else "this cohort"
        said = escape(" ".join(filter(None, (overlap["sentence"], overlap.get("limits")))))
        if overlap["external"]:
            out.print(said)
        else:
            out.print(f"[yellow]{'not external' if overlap['external'] is False else 'note'}:[/yellow] {said}")
        out.print(_comparison_table(res["comparison"], word))
        without = res.get("without_overlap")
        if without and without.get("available"):
            c = without["cohort"]
            out.print(f"without the patients in the training set ({c['patients']} patients, {c['images']} images):")
            out.print(_comparison_table(without["comparison"], "without them"))
        elif without:
            out.print(f"without the patients in the training set: no figures ({escape(without['reason'])})")
        if "recalibration" in res:
            rec = res["recalibration"]
            out.print(f"recalibrated ({rec['method']}): intercept {rec['intercept']:.3f}, slope {rec['slope']:.3f}; "
                      f"held-out calibration-in-the-large {rec['before']['calibration']['intercept']:.3f} -> "
                      f"{rec['after']['calibration']['intercept']:.3f}; bundle: {target / 'bundle-recalibrated'}")
        out.print(f"report: {target / 'report.html'}")

    guard(go)


def _comparison_table(comparison: list[dict], word: str = "external") -> Table:
    """Each metric: the development (cross-validated) figure, the evaluated cohort's (`word`:
    "external" only for a cohort checked to be external) with its CI, the difference."""
    table = Table("metric", "development (CV, pooled)", f"{word} [95 % CI]", "Δ")
    for r in comparison:
        e, dev = r["external"], r["reference"]
        ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None and e.get("high") is not None else ""
        table.add_row(r["metric"], "—" if dev is None else f"{dev:.3f}",
                      "—" if e.get("point") is None else f"{e['point']:.3f}{ci}",
                      "—" if r["difference"] is None else f"{r['difference']:+.3f}")
    return table
