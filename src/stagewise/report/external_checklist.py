"""TRIPOD+AI items of an external validation: stated from external.json, or left to the authors.

TRIPOD+AI (Collins et al., BMJ 2024) asks an evaluation of a model on new data to state the
data and its differences from the development data, how predictions were made (unchanged
model, fixed threshold), the performance measures with their uncertainty (discrimination,
calibration, clinical utility), any model updating and what it was fitted on. Those follow
from the evaluation and are written here; eligibility, outcome assessment, data source and
interpretation are the authors' to write.
"""

from __future__ import annotations

from stagewise.report.formatting import DASH, fmt_num, fmt_setting
from stagewise.report.tripod_items import external_items


def _independence(overlap: dict, without: dict) -> list[str]:
    """The overlap check's finding, how it was checked, and which figures leave the overlap out."""
    return [
        overlap["sentence"],
        "checked against the bundle's record of its training set: identical decoded pixels, near-duplicate images "
        f"(perceptual hash {overlap.get('perceptual')} within {overlap.get('near_duplicate_bits')} of 64 bits) and "
        "patient ids (salted hashes); " + overlap.get("limits", ""),
        (f"figures are given on every patient and without the {overlap['patients_overlapping']} overlapping "
         f"patients ({overlap['images_of_overlapping_patients']} images)"
         + ("" if without.get("available") else f": none without them ({without.get('reason')})"))
        if overlap.get("external") is False else "",
    ]


def external_checklist(res: dict) -> tuple[list[dict], list[dict]]:
    """(stated items, items for the authors), each {topic, guide, lines or hint}."""
    b, cohort, s, out = res["bundle"], res["cohort"], res["settings"], res["outcome"]
    dev = b.get("development_cohort") or {}
    auto: list[dict] = []

    def item(topic: str, lines: list[str], guide: str = "TRIPOD+AI") -> None:
        auto.append({"topic": topic, "guide": guide, "lines": [x for x in lines if x]})

    item("Model evaluated (unchanged)", [
        f"bundle of study {b['recipe']}, output {b['output']} (arm {b['arm']}, stages {' → '.join(b.get('stages') or []) or DASH}), "
        f"backbone {b['backbone']}, trained on {b['trained_on']}; stagewise {b['bundle_stagewise']}",
        f"input: one-channel image resized ({b['resize']}) to {b['image_size']} px, as in development",
        b.get("intensity_notice") or (f"intensities read by {b['intensity']['convention']}, as in development"
                                      if (b.get("intensity") or {}).get("convention") else ""),
        "previously recalibrated: " + (f"{b['recalibration']['method']} (as recorded in the bundle)" if b.get("recalibration") else "no"),
    ])
    item("Outcome in the validation data", [
        f"column {out['column']!r}; positive values {', '.join(out['positive'])}; negative values {', '.join(out['negative'])}",
        f"the bundle predicts {b.get('outcome_text') or b['outcome']}: check that both cohorts define and time it alike",
    ])
    item("Participants and sample size", [
        f"{cohort.get('patients', DASH)} patients ({cohort.get('positive_patients', DASH)} with the outcome), "
        f"{cohort.get('images', DASH)} images; {cohort.get('images_scored', DASH)} scored "
        f"({'first image of each patient' if s['test_images'] == 'first' else 'every image'}, patient score = "
        f"{s['patient_aggregate']} of its image scores)",
        f"rows left out for an empty outcome: {cohort.get('rows_dropped_missing_outcome', 0)}",
        f"sites: {', '.join(cohort['sites'])}" if cohort.get("sites") else "",
    ])
    dprev = dev.get("positive_patients") / dev["patients"] if dev.get("patients") else None
    eprev = cohort["positive_patients"] / cohort["patients"] if cohort.get("patients") else None
    item("Differences between development and validation data", [
        f"development: {dev.get('patients', DASH)} patients, prevalence {fmt_num(dprev)}; "
        f"validation: {cohort.get('patients', DASH)} patients, prevalence {fmt_num(eprev)}",
        "calibration-in-the-large and the observed against mean predicted rate show how far the prevalence and case mix moved",
    ])
    item("Performance measures and uncertainty", [
        "discrimination: AUROC with DeLong and patient-bootstrap 95 % CIs",
        f"decisions at the bundle's stored threshold ({fmt_num(b['threshold'], 4)}, chosen on development "
        "data, not re-chosen): sensitivity, specificity, PPV, NPV, balanced accuracy, F1, with patient-bootstrap 95 % CIs",
        "calibration: calibration-in-the-large, calibration slope (Wald 95 % CIs), Brier score, calibration curve",
        "clinical utility: decision curve (net benefit against treat-all and treat-none)",
        f"{s['bootstrap_resamples']} bootstrap resamples of patients, seed {s['seed']}" if s["bootstrap_resamples"]
        else "bootstrap CIs off",
        "compared with the bundle's own cross-validated figures (fold mean ± sd and pooled patient-level CIs)",
    ])
    overlap = res.get("overlap") or {}
    if overlap.get("checked"):
        item("Independence from development data", _independence(overlap, res.get("without_overlap") or {}))
    rec = res.get("recalibration")
    item("Model updating", [
        (f"logistic recalibration ({'intercept only' if rec['method'] == 'intercept' else 'intercept and slope'}) "
         f"fitted on {rec['fitted_on']['n_patients']} patients ({rec['fitted_on']['n_positive']} positive; "
         f"{fmt_num(100 * rec['fit_fraction'], 0)} % of the patients, whole patients, stratified, seed {rec['seed']}) and "
         f"evaluated on the other {rec['held_out']['n_patients']} ({rec['held_out']['n_positive']} positive); "
         f"intercept {fmt_num(rec['intercept'])}, slope {fmt_num(rec['slope'])}; saved as a new bundle") if rec
        else "none: the bundle was evaluated as exported",
    ])
    item("Software", [f"stagewise {res.get('stagewise', DASH)}; engine {s['engine']}; "
                      f"settings {fmt_setting({k: v for k, v in s.items() if k != 'threshold'})}"])
    user = [
        {"topic": "Eligibility and data source", "guide": "TRIPOD+AI",
         "hint": "the validation site(s), period, scanners, inclusion and exclusion criteria; how patients were identified"},
        {"topic": "Outcome assessment", "guide": "TRIPOD+AI",
         "hint": "how and when the outcome was assessed at the validation site, blinded to the model's output?"},
        {"topic": "Missing data", "guide": "TRIPOD+AI", "hint": "patients or images excluded, and why"},
        *([] if overlap.get("checked") else [{
            "topic": "Independence from development data", "guide": "TRIPOD+AI",
            "hint": "confirm that no patient or image of the validation cohort was in the development cohort: this "
                    "evaluation could not check it (the bundle records no training set)"}]),
        {"topic": "Interpretation", "guide": "TRIPOD+AI",
         "hint": "what the loss or gain in transfer means for the intended use; whether recalibration is needed locally"},
    ]
    more, todo = external_items(res)
    return auto + more, user + todo
