"""The reporting checklist: which TRIPOD+AI and CLAIM items this run states, and which the authors must write.

TRIPOD+AI (prediction models) and CLAIM (AI in medical imaging) list what a paper has to report.
Much of it is already fixed by the run (data partition, models, training, thresholds, statistics,
software), so the report states those items from metrics.json and recipe.yaml, and lists the items
only the authors can write (eligibility, outcome definition, data source, ...) as to-dos. The
wording is a reporting standard's, not a layout's, which is why it lives apart from the template.
"""

from __future__ import annotations

from stagewise.recipe import outcome_phrase, strategy_text
from stagewise.report.federated import fold_stages, is_federated, recorded_sites, round_schedule, unfreeze_text
from stagewise.report.thresholds import threshold_words
from stagewise.report.formatting import DASH, fmt_setting
from stagewise.report.tripod_items import SUBGROUP_HINT, curve_lines, participants_lines, subgroup_lines
from stagewise.report.unit_order import is_full_label, ordered_units, recipe_arms
from stagewise.text import counted


def _stage_text(stage: dict, federated: bool = False) -> dict:
    """One recipe stage in words: its kind, training settings, augmentation and CutMix / MixUp.
    A federated arm's stage runs in rounds, its `epochs` the local epochs of each round."""
    aug = stage.get("augment") or {}
    active = [f"{k} {fmt_setting(v)}" if not isinstance(v, bool) else k for k, v in aug.items() if v]
    mix = []
    for name in ("cutmix", "mixup"):
        cfg = stage.get(name)
        label = "CutMix" if name == "cutmix" else "MixUp"
        mix.append(f"{label} α {fmt_setting(cfg.get('alpha'))} on {fmt_setting(cfg.get('p'))} of batches"
                   if cfg else f"{label} off")
    length = round_schedule(stage) if federated and stage.get("rounds") else counted(stage.get('epochs'), 'epoch')
    training = f"{length}, batch {stage.get('batch_size')}, lr {fmt_setting(stage.get('lr'))}"
    if stage.get("lr_decay") is not None:
        training += f" (decay {fmt_setting(stage['lr_decay'])} per group)"
    training += (f", {stage.get('schedule')} schedule, weight decay {fmt_setting(stage.get('weight_decay'))}, "
                 f"BN {stage.get('bn')}")
    if stage.get("unfreeze"):
        training += f"; {unfreeze_text(stage, federated and bool(stage.get('rounds')))}"
    if stage.get("balanced_sampling"):
        training += "; class-balanced sampling"
    return {"kind": stage.get("kind"), "training": training,
            "augment": ", ".join(active) if active else "none", "mix": "; ".join(mix)}


def checklist(metrics: dict, recipe: dict, ctx: dict) -> tuple[list[dict], list[dict]]:
    """(stated items, items for the authors to write), each item {topic, guide, lines or hint}.

    `ctx` is the template context built so far: the checklist repeats its protocol, tuning and
    environment texts so that the checklist and the tables above it say the same thing."""
    arms, cohort, protocol = metrics.get("arms", {}), metrics.get("cohort", {}), metrics.get("protocol", {})
    evidence = metrics.get("evidence", {})
    r_cohort = recipe.get("cohort") or {}
    r_arms = recipe_arms(recipe)
    order = ordered_units(arms)
    models = [n for n in order if arms[n].get("kind") == "model"]
    auto = [_partition_item(metrics, ctx, arms, order, models)]
    auto += _tripod_items(metrics, evidence)
    auto += _model_items(recipe, arms, models, r_arms)
    auto += _federated_items(arms, models, r_arms)
    auto += _selection_items(ctx, protocol)
    auto += _statistics_items(metrics, recipe, arms, order, evidence)
    missing = cohort.get("missing")
    if missing is not None:
        auto.append(_item("Missing data", "TRIPOD+AI", _missing_lines(missing, r_cohort)))
    auto += _failure_and_software_items(metrics, ctx, arms, models)
    user = _user_items(r_cohort, missing)
    if not (evidence.get("subgroups") or {}).get("units"):
        user.append({"topic": "Subgroups and fairness", "guide": "TRIPOD+AI", "hint": SUBGROUP_HINT})
    return auto, user


def _tripod_items(metrics: dict, evidence: dict) -> list[dict]:
    """Participants (the flow, the characteristics table) and subgroup performance, where computed."""
    items = []
    if lines := participants_lines(metrics.get("cohort", {})):
        items.append(_item("Participants: flow and characteristics", "TRIPOD+AI", lines))
    if lines := subgroup_lines(evidence.get("subgroups") or {}):
        items.append(_item("Subgroups and fairness", "TRIPOD+AI", lines))
    return items


def _item(topic: str, guide: str, lines: list[str]) -> dict:
    """A stated item; empty lines (a fact this run lacks) are left out."""
    return {"topic": topic, "guide": guide, "lines": [x for x in lines if x]}


def _partition_item(metrics: dict, ctx: dict, arms: dict, order: list[str], models: list[str]) -> dict:
    """Data partition: protocol, cohort size and patients per split (full-label units' splits)."""
    cohort = metrics.get("cohort", {})
    folds = next((arms[n].get("folds") for n in order if arms[n].get("folds")), [])
    n_test = sorted({f.get("n_test_patients") for f in folds if f.get("n_test_patients") is not None})
    full = [n for n in models if is_full_label(arms[n])] or order
    n_train = sorted({f.get("n_train_patients") for n in full[:1] for f in arms[n].get("folds", [])
                      if f.get("n_train_patients") is not None})
    span = lambda v: DASH if not v else (str(v[0]) if len(v) == 1 else f"{v[0]}–{v[-1]}")  # noqa: E731
    return _item("Data partition", "TRIPOD+AI, CLAIM", [
        ctx["protocol"] + f"; split seed {metrics.get('seed', DASH)}",
        f"cohort: {cohort.get('patients', DASH)} patients ({cohort.get('positive_patients', DASH)} positive), "
        f"{cohort.get('images', DASH)} images",
        f"per split: {span(n_train)} training and {span(n_test)} test patients"
        + (" (full-label units; label-fraction units train on fewer)" if len(models) > len(full) else ""),
        f"test images: {ctx['protocol_details'][0][1]}; patient score: {ctx['protocol_details'][1][1]}",
    ])


def _model_items(recipe: dict, arms: dict, models: list[str], r_arms: dict) -> list[dict]:
    """Preprocessing, model and weight source, augmentation, training: from recipe.yaml."""
    items = []
    data = recipe.get("data") or {}
    if data:
        items.append(_item("Image preprocessing", "CLAIM", [f"images resized to {data.get('image_size')} px ({data.get('resize')})"]))
    items.append(_item("Model and pretrained-weight source", "TRIPOD+AI, CLAIM", [
        f"{n}: backbone {arms[n].get('backbone')}"
        + (f", weights file {r_arms[arms[n]['base_arm']]['backbone'].get('weights')}"
           if (r_arms.get(arms[n].get("base_arm")) or {}).get("backbone", {}).get("weights") else "")
        + (lambda h: f"; head dropout {fmt_setting(h.get('dropout'))}, hidden {fmt_setting(h.get('hidden'))}"
           if h else "")((r_arms.get(arms[n].get("base_arm")) or {}).get("head"))
        for n in models if is_full_label(arms[n])
    ] or ["no image-model arms"]))
    stage_lines, stop_lines = [], []
    for name, arm in r_arms.items():
        for i, stage in enumerate(arm.get("stages") or []):
            st = _stage_text(stage, (arm.get("sites") or {}).get("mode") == "federated")
            stage_lines.append(f"{name}, stage {i + 1} ({st['kind']}): augmentation {st['augment']}; {st['mix']}")
            stop_lines.append(f"{name}, stage {i + 1} ({st['kind']}): {st['training']}")
    items.append(_item("Augmentation and CutMix / MixUp", "CLAIM", stage_lines or ["not recorded (no recipe.yaml)"]))
    items.append(_item("Training and stopping rule", "TRIPOD+AI, CLAIM",
                       ["fixed number of epochs per stage; the last-epoch model is evaluated (no early stopping)"]
                       + stop_lines))
    return items


def _federated_items(arms: dict, models: list[str], r_arms: dict) -> list[dict]:
    """Federated training, per federated arm: the strategy and its parameters, the sites, each
    stage's rounds and local epochs, and what a round shares (recipe.yaml and the round records)."""
    lines = []
    for n in models:
        if not is_federated(arms[n]) or not is_full_label(arms[n]):
            continue
        arm, st = r_arms.get(arms[n].get("base_arm")) or {}, arms[n]["sites_training"]
        stages = fold_stages(arm)
        rounds = st.get("rounds") or []
        sites = recorded_sites(st.get("round_loss") or [])
        groups = list(dict.fromkeys(", ".join(r.get("trainable") or []) for r in rounds))
        lines.append(
            f"{n}: {strategy_text(arm.get('sites') or {})}; {counted(len(rounds), 'round')} over "
            f"{counted(len(sites), 'site') if sites else DASH + ' sites'} ({', '.join(sites) or DASH}): "
            + "; ".join(f"stage {i + 1} ({s.get('kind')}) {round_schedule(s)}" for i, s in enumerate(stages))
            + f"; in each round the sites receive and send back the tensors of the groups that train only "
              f"({' / '.join(groups) or DASH}), with their mean training loss and number of training images; "
              "the training loss per round is in the Federated training section")
    return [_item("Federated training", "TRIPOD+AI, CLAIM", lines)] if lines else []


def _selection_items(ctx: dict, protocol: dict) -> list[dict]:
    """How hyperparameters and the decision threshold were chosen (never on test parts)."""
    tuned = [t for t in ctx["tuning"]]
    return [
        _item("Hyperparameter selection", "TRIPOD+AI", [
            f"nested CV for {t['unit']}: {t['grid']} chosen by an inner {t['inner_folds']}-fold grouped CV "
            f"inside each outer training fold" for t in tuned
        ] or ["no tuning: every setting fixed in the recipe before the run"]),
        _item("Threshold selection", "TRIPOD+AI",
              [f"decision threshold {threshold_words(protocol)} (never on the test part); every threshold-based "
               "figure uses it", *([ctx["thresholds"]["unreliable_sentence"]] if ctx["thresholds"]["unreliable"] else [])]),
    ]


def _statistics_items(metrics: dict, recipe: dict, arms: dict, order: list[str], evidence: dict) -> list[dict]:
    """Comparators, confidence intervals and tests, calibration and clinical utility."""
    ev = evidence.get("units", {})
    evaluation = recipe.get("evaluation") or {}
    r_cohort = recipe.get("cohort") or {}
    baselines = [n for n in order if arms[n].get("kind") == "baseline"]
    clinical = [n for n in order if arms[n].get("kind") == "clinical"]
    items = [_item("Comparators", "TRIPOD+AI", [
        f"routine-score baselines on the same folds: {', '.join(baselines)}" if baselines else "no routine-score baseline",
        (f"clinical-only logistic regression on {', '.join(r_cohort.get('clinical') or []) or 'clinical columns'} "
         "(median imputation and scaling fitted on each training part)") if clinical else "no clinical-only model",
    ])]
    n_boot = evaluation.get("bootstrap")
    tests = [
        f"fold metrics: mean ± sd over {metrics.get('n_splits', DASH)} splits",
        f"patient-level 95 % bootstrap CIs ({n_boot} resamples of patients)" if n_boot else "bootstrap CIs off",
        "AUROC: DeLong 95 % CI; paired DeLong test on the same patients",
        "fold AUROC differences: Nadeau–Bengio corrected resampled t-test and Wilcoxon signed-rank test",
        (f"{len(evidence.get('comparisons', []))} comparisons; primary: {evidence['primary']['a']} vs "
         f"{evidence['primary']['b']} ({evidence['primary']['test']}"
         f"{', stated in the recipe' if evidence['primary'].get('stated') else ', the default'}); the other p-values "
         "Holm-adjusted") if evidence.get("primary") else
        f"{len(evidence.get('comparisons', []))} comparisons, reported without multiplicity correction",
        f"patient level: {evidence.get('patient_level')}" if evidence.get("patient_level") else "",
    ]
    items.append(_item("Confidence intervals and tests", "TRIPOD+AI, CLAIM", tests))
    calibrated = [n for n in order if ev.get(n, {}).get("calibration")]
    items.append(_item("Calibration and clinical utility", "TRIPOD+AI", [
        f"calibration curve, slope, intercept and Brier score for {', '.join(calibrated)}" if calibrated
        else "calibration not computed",
        "decision curves (net benefit vs treat-all / treat-none)" if any(ev.get(n, {}).get("decision_curve") for n in order) else "",
        *curve_lines(ev, calibrated),
        "baseline scores are not probabilities: no calibration for them" if baselines else "",
    ]))
    return items


def _failure_and_software_items(metrics: dict, ctx: dict, arms: dict, models: list[str]) -> list[dict]:
    """Failure analysis (the Grad-CAM maps shown) and the software and compute that ran."""
    sal = {n: arms[n].get("saliency") or [] for n in models}
    return [
        _item("Failure analysis", "CLAIM", [
            f"Grad-CAM maps for {sum(bool(s.get('correct')) for s in v)} correct and "
            f"{sum(not s.get('correct') for s in v)} wrong test images of {n}"
            + (" (the final global model of each fold's federated training, on test images of each site)"
               if any(s.get("site") for s in v) else "") for n, v in sal.items() if v
        ] + [f"no Grad-CAM maps of {n}: FedBN keeps BatchNorm at each site, so its training ends without one global "
             "model to draw them from" for n in models if is_federated(arms[n]) and not sal[n]
             and arms[n]["sites_training"].get("bn_stats") == "local"]
          or ["no saliency maps (evaluation.saliency 0 or backbone without spatial features)"]),
        _item("Software and compute", "TRIPOD+AI, CLAIM", [
            f"stagewise {ctx['version']}; " + ", ".join(f"{k} {v}" for k, v in ctx["environment"]
                                                        if k in ("python", "torch", "torchvision", "timm", "scikit-learn")),
            f"compute: {metrics.get('compute', DASH)}; seed {metrics.get('seed', DASH)}",
        ]),
    ]


def _user_items(r_cohort: dict, missing: dict | None) -> list[dict]:
    """The items only the authors can write (eligibility, outcome definition, data source, ...)."""
    user = [
        {"topic": "Eligibility criteria", "guide": "TRIPOD+AI, CLAIM", "hint": "inclusion and exclusion criteria; how patients were identified"},
        {"topic": "Outcome definition and timing", "guide": "TRIPOD+AI, CLAIM",
         "hint": _outcome_hint(r_cohort)},
        {"topic": "Data source and dates", "guide": "TRIPOD+AI, CLAIM", "hint": "institutions, scanners, acquisition period, image selection"},
        {"topic": "Sample-size justification", "guide": "TRIPOD+AI", "hint": "why this number of patients and events suffices"},
        {"topic": "External validation", "guide": "TRIPOD+AI, CLAIM", "hint": "performance on data from another site or period, or why none"},
        {"topic": "Intended use", "guide": "TRIPOD+AI, CLAIM", "hint": "target population, clinical setting, the decision the model informs"},
    ]
    if missing is None:
        user.append({"topic": "Missing data", "guide": "TRIPOD+AI",
                     "hint": "how many values were missing and why (this run used no clinical or baseline columns)"})
    else:
        user.append({"topic": "Missing data: why", "guide": "TRIPOD+AI",
                     "hint": "why the values counted above are missing (not recorded, not measured, not applicable) "
                             "and whether missingness may relate to the outcome"})
    return user


def _outcome_hint(r_cohort: dict) -> str:
    """The outcome item's question, quoting the recipe's wording of the outcome when it has one."""
    column = r_cohort.get("outcome", "outcome")
    label, horizon = r_cohort.get("outcome_label"), r_cohort.get("outcome_horizon")
    if not (label or horizon):
        return f"what “{column}” means, how and when it was assessed, by whom, blinded to the images?"
    return (f"the recipe words “{column}” as “{outcome_phrase(column, label, horizon)}”: how and when was it assessed, "
            "by whom, blinded to the images?")


def _missing_lines(missing: dict, r_cohort: dict) -> list[str]:
    """Per column the rows (and patients) without a value, and how the run handled them."""
    clinical_cols = set(r_cohort.get("clinical") or [])
    lines = []
    for col, m in missing.items():
        if not m["rows"]:
            how = "complete"
        elif col in clinical_cols:
            how = "median-imputed inside each fold (the median of its training part), wherever the column is used"
        else:
            how = "baseline score: rows without a value are left out of that baseline's figures"
        lines.append(f"{col}: missing in {m['rows']} of {m['of_rows']} rows ({m['patients']} patients); {how}")
    return lines or ["no clinical or baseline columns"]
