"""What a bundle's model card states, and the card itself (MODEL_CARD.md).

A card travels with the model to people who never saw the report, so it states what they
need to read one prediction: what the model is for, the cohort's prevalence (PPV and NPV
depend on it), how well its risks were calibrated, whether its backbone started from
pretrained weights or at random, how its threshold was set, and the figures of *this* model:
a fold bundle quotes the metrics of the patients its fold held out (not the study mean), a
refit bundle, which has no held-out patients, says that its figures are the arm's
cross-validated ones and that its threshold is the protocol's rule applied to the arm's
out-of-fold scores. Every bundle also
states how its model was trained (pooled, or federated over which sites and rounds) and the
figures of its own decision rule: the cross-validated out-of-fold scores at its threshold. The facts are
values of metrics.json, copied into bundle.json (`card_facts`); nothing here names a
patient, a file or a folder.
"""

from __future__ import annotations

from stagewise.recipe import task_outcome

HELD_OUT = ("auroc", "balanced_accuracy", "f1", "sensitivity", "specificity", "n_test_patients")
INTENDED_USE = ("research: an estimate of the probability of the outcome from one image of a patient like those of "
                "the development cohort; not a diagnosis, and not for clinical decisions without local validation")


def _fold_metrics(unit: dict, fold: str) -> dict | None:
    for f in unit.get("folds", []):
        if f"r{f.get('repeat')}-f{f.get('fold')}" == fold:
            return {k: f[k] for k in (*HELD_OUT, "threshold") if k in f}
    return None


def card_facts(metrics: dict, arm: str, backbone_spec: str, threshold_rule: str, refit: bool, fold: str | None) -> dict:
    """The facts of one arm's card: intended use, prevalence, calibration, initialisation,
    the threshold rule and (fold bundles) the held-out metrics of that fold."""
    cohort = metrics.get("cohort", {})
    unit = metrics["arms"][arm]
    calibration = (metrics.get("evidence", {}).get("units", {}).get(arm) or {}).get("calibration")
    facts = {
        "intended_use": INTENDED_USE,
        "cohort": {k: cohort[k] for k in ("patients", "positive_patients", "images", "positive_images") if k in cohort},
        "calibration": {k: calibration[k] for k in ("slope", "intercept", "brier") if k in calibration} if calibration else None,
        "backbone_init": "random" if backbone_spec.startswith("scratch:") else "pretrained",
        "threshold_rule": threshold_rule,
    }
    if refit:  # replaced by the rule on the out-of-fold scores where the run holds them (export.refit_threshold)
        facts["threshold_rule"] = (f"the median of the {len(unit.get('folds', []))} fold thresholds ({threshold_rule}, "
                                   "each chosen without its fold's test part): a refit has no patients left to choose one on")
    elif fold is not None:
        facts["held_out"] = {"fold": fold, **(_fold_metrics(unit, fold) or {})}
        facts["threshold_rule"] = f"{threshold_rule}, {_fold_where(unit, fold)} (fold {fold})"
    return facts


_WHERE = {"inner_cv": "chosen on the inner out-of-fold scores of the training part",
          "training": "chosen on the training part's own scores", "fixed": "fixed in the recipe, for every fold"}
"""Where a fold's threshold was chosen (its `threshold_on` in metrics.json), in words."""


def _fold_where(unit: dict, fold: str) -> str:
    for f in unit.get("folds", []):
        if f"r{f.get('repeat')}-f{f.get('fold')}" == fold:
            return _WHERE.get(f.get("threshold_on"), "chosen on the training part")  # a run before threshold_on
    return "chosen on the training part"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ci(f: dict | None) -> str:
    if not f or f.get("point") is None:
        return "n/a"
    if f.get("low") is None or f.get("high") is None:
        return f"{f['point']:.3f}"
    return f"{f['point']:.3f} ({f['low']:.3f} to {f['high']:.3f})"


def _at_threshold_lines(t: dict) -> list[str]:
    """The figures of the decision rule this bundle deploys (bundle.json `at_threshold`)."""
    a = t.get("at_threshold")
    if not a:
        return []
    ci = f", patient bootstrap 95 % CI over {a['bootstrap_resamples']} resamples" if a.get("bootstrap_resamples") else ""
    return [f"  - At this bundle's threshold {a['threshold']:.4f} (the decision rule it deploys), on the "
            f"cross-validated models' out-of-fold scores of {a['n_patients']} patients ({a['n_positive']} positive; "
            f"each scored by a model that did not train on it, not by this bundle's model{ci}): sensitivity "
            f"{_ci(a.get('sensitivity'))}, specificity {_ci(a.get('specificity'))}, PPV {_ci(a.get('ppv'))}, NPV "
            f"{_ci(a.get('npv'))}, balanced accuracy {_ci(a.get('balanced_accuracy'))}"]


def training_set_line(ts: dict | None, pretrained: bool, missing: str | None = None) -> str:
    """What the bundle carries of its training set (training_set.json), or that it carries none
    and why (`missing`, bundle.json's `training_set_missing`; else an older bundle)."""
    if not ts:
        return (f"- Training set: not recorded ({missing or 'a bundle exported before stagewise recorded it'}), so an "
                "evaluation cannot check whether its cohort overlaps the training images")
    source = (f" and {ts['source_manifest_images']} images of its stages' source manifests"
              if ts.get("source_manifest_images") else "")
    recal = (f" and the {ts['recalibration_images']} images its recalibration was fitted on"
             if ts.get("recalibration_images") else "")
    return (f"- Training set (`{ts['file']}`): for the {ts['images']} cohort images{source} it was trained on{recal}, a salted "
            f"SHA-256 of each image's decoded pixels and a 64-bit perceptual hash ({ts['perceptual']}), and a salted "
            f"SHA-256 of each of those {ts['patients']} patients' ids (the salt is this bundle's own). They "
            "name no patient or file; the perceptual hashes can show that an image one already holds is (nearly) "
            "one of the training images. `stagewise evaluate` uses them to find images and patients of an "
            "evaluated cohort that were in training."
            + (" The images that trained the backbone's starting (pretrained) weights elsewhere are not listed."
               if pretrained else ""))


def _federation_lines(t: dict) -> list[str]:
    """A deployed federated job's model (`bundle.federation`): the job's threshold-free
    cross-validated AUROC per site, if it cross-validated, and what the coordinator cannot know."""
    cv = (t.get("federation") or {}).get("cross_validation")
    lines = []
    if cv:
        sites = ", ".join(f"{s} {_num(m['auroc'].get('mean'))} ± {_num(m['auroc'].get('sd'))} "
                          f"({m.get('n_test_patients')} test patients)" for s, m in cv["sites"].items())
        across = cv.get("auroc_across_sites") or {}
        lines.append(f"  - Cross-validated in the same job over {cv['folds']} folds (each site's own patient-grouped "
                     "folds; the fold models of the arm, each trained federated on the fold's training patients of "
                     "every site and scored at each site on its own held-out patients, not this model): AUROC per site "
                     f"(mean ± sd over folds) {sites}; across sites {_num(across.get('mean'))} ± "
                     f"{_num(across.get('sd'))} (weighted by each site's test patients)")
    else:
        lines.append("  - Not cross-validated: the job trained the final model only (--no-cv), so no performance "
                     "figure of this arm exists")
    lines.append("  - No sensitivity, specificity, PPV, NPV or calibration at this threshold: the coordinator holds no "
                 "out-of-fold scores (each site's scores stay at the site). Measure them on local data "
                 "(`stagewise evaluate`) before any use.")
    return lines


def render_model_card(info: dict) -> str:
    """MODEL_CARD.md from bundle.json's `info`."""
    lines = [f"# {info['recipe']}: {', '.join(t['arm'] for t in info['tasks'])}", ""]
    init = {"random": "randomly initialised (no pretrained weights)", "pretrained": "started from pretrained weights"}
    first = info["tasks"][0].get("card", {})
    lines.append(f"- Intended use: {first.get('intended_use', INTENDED_USE)}")
    lines.append(f"- Backbone: `{info['backbone']}`, {init.get(first.get('backbone_init'), 'initialisation not recorded')}, "
                 f"shared by {len(info['tasks'])} head(s); trained on {info['source']}")
    intensity = info.get("intensity") or {}
    lines.append(f"- Input: one-channel image, resized ({info['resize']}) to {info['image_size']} px, intensities in "
                 "[0, 1] by " + (f"`{intensity['convention']}`: {intensity.get('description', '')}" if intensity
                                 else "the earlier convention (DICOM by each image's minimum and maximum)"))
    lines.append(training_set_line(info.get("training_set"), first.get("backbone_init") == "pretrained",
                                   info.get("training_set_missing")))
    c = first.get("cohort") or {}
    if c.get("patients"):
        lines.append(f"- Development cohort: {c['patients']} patients, {c.get('positive_patients')} positive "
                     f"(prevalence {c.get('positive_patients', 0) / c['patients']:.1%}); {c.get('images')} images. "
                     "PPV and NPV at another prevalence differ.")
    for t in info["tasks"]:
        s, card = t["metrics"], t.get("card", {})
        lines.append(
            f"- `{t['output']}` (arm {t['arm']}, stages {' -> '.join(t['stages'])}): probability of "
            f"{task_outcome(t, name_column=True)}; decision threshold {t['threshold']:.4f}: {card.get('threshold_rule', 'chosen on training data')}.")
        if t.get("training"):
            lines.append(f"  - Training of this model: {t['training']['description']}")
        lines += _at_threshold_lines(t)
        if "federation" in t:  # a deployment's model: what its coordinator knows, and nothing more
            lines += _federation_lines(t)
            continue
        held = card.get("held_out")
        if held:
            lines.append(f"  - This model (fold {held['fold']}), on the {held.get('n_test_patients', 'n/a')} patients its "
                         f"fold held out: AUROC {_num(held.get('auroc'))}, balanced accuracy "
                         f"{_num(held.get('balanced_accuracy'))}, F1 {_num(held.get('f1'))}, sensitivity "
                         f"{_num(held.get('sensitivity'))}, specificity {_num(held.get('specificity'))}")
        lines.append(f"  - The arm across {t['n_folds']} folds (cross-validated, mean ± sd; balanced accuracy and F1 "
                     "at each fold's own threshold): AUROC "
                     f"{s['auroc']['mean']:.3f} ± {s['auroc']['sd']:.3f}, balanced accuracy "
                     f"{s['balanced_accuracy']['mean']:.3f} ± {s['balanced_accuracy']['sd']:.3f}, "
                     f"F1 {s['f1']['mean']:.3f} ± {s['f1']['sd']:.3f}"
                     + ("; a refit has no held-out patients, so these are the figures to quote (for its decisions, "
                        "the figures at its threshold above)" if "held_out" not in card
                        and info.get("refit") else ""))
        cal = card.get("calibration")
        lines.append(f"  - Calibration of the arm's out-of-fold risks: slope {_num(cal.get('slope'), 2)}, intercept "
                     f"{_num(cal.get('intercept'), 2)}, Brier {_num(cal.get('brier'))} (slope 1 and intercept 0 ideal)"
                     if cal else "  - Calibration: not computed in this run")
    lines += ["", f"stagewise {info['stagewise']}. Research use only. Validate on local data before any clinical",
              "use; the cross-validated figures describe the development cohort, not another site."]
    return "\n".join(lines) + "\n"
