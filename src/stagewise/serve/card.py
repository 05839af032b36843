"""The model card the page shows and `GET /model-card` returns, from what the bundle holds:
bundle.json (tasks, thresholds, cross-validated metrics, how the model was trained, the
figures at the bundle's own threshold: sensitivity, specificity, PPV, NPV and balanced
accuracy of the cross-validated models' scores decided at it) and, for bundles exported
since oof.json exists, the cohort's counts, the protocol and patient-level 95 % CIs."""

from __future__ import annotations

from stagewise.recipe import ThresholdRule, task_outcome
from stagewise.version import __version__

WARNING = ("Research use only. This model is not a medical device and has not been approved for diagnosis or "
           "treatment decisions. Its figures describe the cohort it was developed on; validate it on local "
           "data before relying on it.")


def intended_use(info: dict, dims: int) -> str:
    outcomes = ", ".join(dict.fromkeys(task_outcome(t) for t in info["tasks"]))
    kind = "a single 2D image (for example a radiograph)" if dims == 2 else "a 3D volume"
    return (f"Estimates the probability of {outcomes} from {kind} of the same kind, view and population as the "
            f"development cohort, to support research and local validation. It sees only the image: no history, "
            f"no clinical data, no earlier images.")


def fold_threshold_words(protocol: dict | None) -> str | None:
    """How the cross-validation's fold thresholds were chosen, from oof.json's protocol; None
    where a bundle does not record it."""
    if not protocol or protocol.get("threshold") is None:
        return None
    try:
        rule = ThresholdRule.model_validate(protocol["threshold"])
    except ValueError:
        return None
    return f"{rule.describe()}, {rule.chosen_on}"


def model_card(info: dict, validation: dict | None, dims: int, engine: str, max_upload: int,
               intensity_notice: str | None = None) -> dict:
    """The card's fields; `intensity_notice` (`Bundle.intensity_notice`) says, for a bundle made
    under an earlier intensity convention, that its probabilities can differ from its validation."""
    intensity = info.get("intensity") or {}
    outputs = []
    for t in info["tasks"]:
        v = (validation or {}).get("outputs", {}).get(t["output"], {})
        outputs.append({
            "output": t["output"], "arm": t["arm"], "outcome": t["outcome"], "outcome_label": t.get("outcome_label"),
            "outcome_horizon": t.get("outcome_horizon"), "outcome_text": task_outcome(t), "stages": t["stages"],
            "threshold": t["threshold"], "n_folds": t["n_folds"],
            # the rule and the scores it was chosen on (the card's words); absent in bundles made before they were recorded
            "threshold_source": (t.get("card") or {}).get("threshold_rule"),
            "cross_validated": {m: t["metrics"][m] for m in ("auroc", "balanced_accuracy", "f1") if m in t["metrics"]},
            "patient_level_ci": v.get("patient_level") or None,
            "at_threshold": t.get("at_threshold"),
            "training": (t.get("training") or {}).get("description"),
            "validation_images": v.get("n"),
        })
    return {
        "title": info["recipe"],
        "research_use_only": True,
        "warning": WARNING,
        "intended_use": intended_use(info, dims),
        "trained_on": info["source"],
        "cohort": (validation or {}).get("cohort") or None,
        "protocol": (validation or {}).get("protocol") or None,
        "fold_thresholds": fold_threshold_words((validation or {}).get("protocol")),
        "ci_settings": (validation or {}).get("ci_settings") or None,
        "validation_distribution": validation is not None and bool(validation.get("outputs")),
        "backbone": info["backbone"],
        "input": {"dimensions": dims, "image_size": info["image_size"], "resize": info["resize"],
                  "intensities": f"one channel in [0, 1] by {intensity['convention']}: {intensity.get('description', '')}"
                  if intensity else "one channel in [0, 1] by the earlier convention (DICOM by each image's minimum "
                                    "and maximum)"},
        "intensity_notice": intensity_notice,
        "outputs": outputs,
        "bundle_stagewise": info["stagewise"],
        "stagewise": __version__,
        "engine": engine,
        "max_upload_bytes": max_upload,
        "privacy": "Uploads are processed in memory and never written to disk; nothing is stored after the answer.",
    }
