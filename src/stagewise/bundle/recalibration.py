"""A bundle whose probabilities pass through a logistic recalibration fitted on an external
cohort (`stagewise evaluate --recalibrate`): a new bundle beside the source, written through
`export.build_bundle` like every bundle, with the map recorded in its bundle.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from stagewise.bundle.export import build_bundle
from stagewise.bundle.oof import VALIDATION_FILE
from stagewise.bundle.model_card import render_model_card
from stagewise.bundle.training_set import training_set_summary, write_training_set
from stagewise.evaluation.calibration import apply_recalibration


def recalibrated_bundle(source: str | Path, out: str | Path, output: str, recalibration: dict,
                        training_set: dict | None = None) -> Path:
    """A copy of bundle `source` in `out` whose `output` probabilities pass through a logistic
    recalibration, p' = sigmoid(intercept + slope logit p), recorded in bundle.json (with what
    it was fitted on), so that `predict` and `serve` apply it. Its threshold is mapped the same
    way (the decisions stay those of the stored threshold) and its out-of-fold validation
    probabilities too (their order, and so each new probability's place among them, stays).
    A bundle already recalibrated composes the two maps into one. `training_set`, when given,
    replaces the source's training_set.json (`training_set.with_recalibration`: the source's
    training images and patients and those the recalibration was fitted on)."""
    source, out = Path(source), Path(out)
    info = json.loads((source / "bundle.json").read_text())
    task = next(t for t in info["tasks"] if t["output"] == output)
    a, b = float(recalibration["intercept"]), float(recalibration["slope"])
    previous = task.get("recalibration")
    if previous:  # sigmoid(a + b logit(sigmoid(a0 + b0 logit p))) = sigmoid(a + b a0 + b b0 logit p)
        a, b = a + b * previous["intercept"], b * previous["slope"]
    task.setdefault("threshold_before_recalibration", task["threshold"])
    task["recalibration"] = {**recalibration, "intercept": a, "slope": b, "composed_with_earlier": bool(previous)}
    if training_set is not None:
        info["training_set"] = training_set_summary(training_set)
    task["threshold"] = float(apply_recalibration(task["threshold_before_recalibration"], a, b))
    if task.get("at_threshold"):  # a monotone map: the same decisions, so the same figures, at the mapped threshold
        task["at_threshold"]["threshold"] = task["threshold"]

    def fill(tmp: Path) -> None:
        for f in source.iterdir():
            if f.is_file() and f.name not in ("bundle.json", "MODEL_CARD.md", VALIDATION_FILE):
                shutil.copyfile(f, tmp / f.name)
        if training_set is not None:
            write_training_set(tmp, training_set)
        (tmp / "bundle.json").write_text(json.dumps(info, indent=2))
        card = render_model_card(info) + (
            f"\nRecalibrated (`{output}`, logistic, {recalibration['method']}): p' = sigmoid({a:.4f} + {b:.4f} logit p), "
            f"fitted on {recalibration['fitted_on']['n_patients']} patients ({recalibration['fitted_on']['n_positive']} "
            f"positive) of {recalibration['fitted_on'].get('cohort', 'an external cohort')}; the threshold maps to "
            f"{task['threshold']:.4f}.\n")
        (tmp / "MODEL_CARD.md").write_text(card)
        if (source / VALIDATION_FILE).is_file():
            oof = json.loads((source / VALIDATION_FILE).read_text())
            v = oof.get("outputs", {}).get(output)
            if v:
                original = v.get("probability_before_recalibration", v["probability"])
                v["probability_before_recalibration"] = original
                v["probability"] = np.round(apply_recalibration(original, a, b), 6).tolist()
                patients = v.get("patients")
                if patients:
                    original = patients.get("score_before_recalibration", patients["score"])
                    patients["score_before_recalibration"] = original
                    patients["score"] = np.asarray(apply_recalibration(original, a, b), dtype=float).tolist()
            (tmp / VALIDATION_FILE).write_text(json.dumps(oof))
        for path in tmp.iterdir():
            os.chmod(path, 0o644)

    return build_bundle(out, fill)
