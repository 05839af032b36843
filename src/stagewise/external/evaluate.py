"""`evaluate_bundle`: one external validation, from a bundle and a labelled manifest to the
output folder (see `outputs`). Everything is checked before anything is written: the options,
the bundle, the output folder, every manifest row and image; an error lists all it found.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stagewise.version import __version__
from stagewise.bundle import VALIDATION_FILE, Bundle, recalibrated_bundle
from stagewise.evaluation.calibration import apply_recalibration
from stagewise.external.manifest import bundle_recipe, load_external, patient_table, score_cohort
from stagewise.external.groups import breakdowns
from stagewise.external.validation import comparison, development_figures, recalibration, validation_figures
from stagewise.external.options import EvaluateError, ExternalOptions
from stagewise.external.overlap import check_overlap, figures_without
from stagewise.external.outputs import RECALIBRATED, prepare_folder, write_results
from stagewise.errors import RunError
from stagewise.recipe import task_outcome

ABOUT = {
    True: "external validation of a stagewise bundle: the bundle's probabilities on a labelled cohort none of whose "
          "images or patient ids are in its training set, at patient level, against the bundle's own cross-validated "
          "figures",
    False: "evaluation of a stagewise bundle on a labelled cohort that overlaps its training set (see `overlap`), so "
           "not an external validation: the bundle's probabilities at patient level, on every patient and without "
           "the overlapping ones (`without_overlap`), against the bundle's own cross-validated figures",
    None: "evaluation of a stagewise bundle on a labelled cohort whose overlap with the bundle's training set could "
          "not be checked (see `overlap`): the bundle's probabilities at patient level, against the bundle's own "
          "cross-validated figures",
}
"""external.json's `about`, by `overlap.external` (True: checked, none; False: overlap; None: not checked)."""


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def evaluate_bundle(bundle_dir: str | Path, manifest: str | Path, out_dir: str | Path,
                    options: ExternalOptions | None = None, engine: str = "torch") -> dict:
    """Validate the bundle on the manifest's cohort; write the output folder; return what
    external.json holds."""
    t0 = time.perf_counter()
    options = options or ExternalOptions()
    bundle_dir, manifest, out = Path(bundle_dir), Path(manifest), Path(out_dir)
    if not (bundle_dir / "bundle.json").is_file():
        raise RunError(f"{bundle_dir}: not a stagewise bundle (no bundle.json); make one with `stagewise export`")
    if engine not in ("torch", "onnx"):
        raise EvaluateError([f"--engine {engine!r}: choose torch or onnx"])
    bundle = Bundle.load(bundle_dir)
    outputs = [t["output"] for t in bundle.info["tasks"]]
    problems = options.problems(outputs)
    if problems:
        raise EvaluateError(problems)
    j = outputs.index(options.output) if options.output else 0
    task = bundle.info["tasks"][j]
    prepare_folder(out, manifest)
    recipe = bundle_recipe(bundle_dir)
    protocol = recipe.get("protocol") or {}
    test_images = options.test_images or protocol.get("test_images", "all")
    aggregate = options.aggregate or protocol.get("patient_aggregate", "mean")

    cohort = load_external(manifest, options, recipe, task["outcome"])
    overlap = check_overlap(bundle_dir, cohort, bundle.info.get("training_set_missing"))
    prob = score_cohort(bundle, cohort, engine)[:, j]
    table, used = patient_table(cohort, prob, test_images, aggregate)
    threshold = float(task["threshold"])
    external = validation_figures(table, threshold, options.bootstrap, options.seed)
    validation = _read_json(bundle_dir / VALIDATION_FILE) or {}
    external |= breakdowns(cohort, prob, used, table, aggregate, threshold, validation.get("baselines") or {},
                           options.bootstrap, options.seed)
    oof = validation.get("outputs", {}).get(task["output"])
    development = development_figures(task, oof, options.seed)
    summary = cohort.summary()
    results = {
        "about": ABOUT[overlap.record["external"]],
        "stagewise": __version__,
        "bundle": _bundle_facts(bundle, task, threshold, validation, protocol),
        "cohort": summary | {"images_scored": int(used.sum()), "rows_dropped_missing_outcome": len(cohort.dropped)},
        "outcome": {"column": cohort.config.outcome, "positive": list(cohort.config.positive),
                    "negative": list(cohort.config.negative)},
        "settings": {"test_images": test_images, "patient_aggregate": aggregate, "bootstrap_resamples": options.bootstrap,
                     "seed": options.seed, "level": 0.95, "resampling": "patients", "engine": engine,
                     "threshold": "the bundle's stored threshold (chosen on development data, as its model card says), never re-chosen here"},
        "external": external,
        "development": development,
        "comparison": comparison(external, development),
        "overlap": overlap.record,
    }
    if overlap.record["external"] is False:
        results["without_overlap"] = figures_without(cohort, prob, overlap.excluded, test_images, aggregate, threshold,
                                                     options.bootstrap, options.seed, development)
    table["in_training_set"] = table["patient"].astype(str).isin(set(cohort.table["patient"].astype(str)[overlap.excluded]))
    table["part"] = "evaluated"
    if options.recalibrate:
        record, fit = recalibration(table, options.recalibrate, options.fit_fraction, threshold, options.bootstrap,
                                    options.seed)
        table["part"] = np.where(fit, "recalibration fit", "recalibration held out")
        table["score_recalibrated"] = apply_recalibration(table["score"], record["intercept"], record["slope"])
        results["recalibration"] = record
    images = _image_table(cohort.table, prob, used, task["output"]).assign(in_training_set=overlap.flag)
    results["seconds"] = time.perf_counter() - t0
    write_results(out, results, images, table, manifest)
    if options.recalibrate:
        provenance = {k: record[k] for k in ("method", "fit_fraction", "seed", "fitted_on")}
        provenance["fitted_on"] = provenance["fitted_on"] | {"cohort": FITTED_ON[overlap.record["external"]]}
        provenance |= {"intercept": record["intercept"], "slope": record["slope"]}
        fitted = set(table["patient"][fit])  # the recalibration's images join what the new bundle was fitted on
        rows = np.flatnonzero(used & cohort.table["patient"].isin(fitted).to_numpy())
        recalibrated_bundle(bundle_dir, out / RECALIBRATED, task["output"], provenance, overlap.recalibrated(rows))
    from stagewise.report.html import write_external_report

    write_external_report(out)
    return results


FITTED_ON = {True: "an external validation cohort (stagewise evaluate)",
             False: "a cohort of `stagewise evaluate` that overlaps the bundle's training set (not external)",
             None: "a cohort of `stagewise evaluate` whose overlap with the bundle's training set was not checked"}
"""What a recalibration was fitted on, in the recalibrated bundle, by `overlap.external`."""


def _bundle_facts(bundle: Bundle, task: dict, threshold: float, validation: dict, protocol: dict) -> dict:
    """external.json's `bundle`: what was evaluated (no path, no file name)."""
    return {"recipe": bundle.info["recipe"], "output": task["output"], "arm": task["arm"],
            "outcome": task["outcome"], "outcome_text": task_outcome(task, name_column=True),
            "backbone": bundle.info["backbone"], "stages": task.get("stages", []),
            "trained_on": bundle.info["source"], "bundle_stagewise": bundle.info["stagewise"],
            "image_size": bundle.info["image_size"], "resize": bundle.info["resize"], "threshold": threshold,
            "recalibration": task.get("recalibration"), "development_cohort": validation.get("cohort", {}),
            "development_protocol": protocol, "intensity": bundle.info.get("intensity"),
            "intensity_notice": bundle.intensity_notice, "integrity_notice": bundle.integrity_notice,
            "training_set": bundle.info.get("training_set")}


def _image_table(t: pd.DataFrame, prob: np.ndarray, used: np.ndarray, output: str) -> pd.DataFrame:
    """Per image (local file: names the manifest row, file and patient)."""
    out = pd.DataFrame({"row": t["row"], "image": t["path"], "patient": t["patient"], "y": t["y"],
                        f"probability:{output}": prob, "used_for_patient_score": used})
    if "site" in t:
        out.insert(3, "site", t["site"])
    return out
