"""The report's words about decision thresholds: the protocol's rule and where each fold's
threshold was chosen, the units whose folds chose on the fold model's own training scores
while those separated (almost) perfectly (`threshold_unreliable` in metrics.json: the
decision figures beside it are unreliable), and the units that fell back to training scores
where the recipe asked for inner out-of-fold ones (local and federated arms, a training part
too small for inner folds). Every word is read from metrics.json."""

from __future__ import annotations

from stagewise.evaluation.thresholds import UNRELIABLE_SENTENCE, as_rule
from stagewise.report.formatting import DASH, fmt_setting


def threshold_words(protocol: dict) -> str:
    """'youden, chosen on ...' from metrics.json's protocol (a short form or a mapping)."""
    raw = protocol.get("threshold")
    if raw is None:
        return DASH
    try:
        rule = as_rule(raw)
    except ValueError:  # a run written by another version: show the setting as written
        return fmt_setting(raw)
    return f"{rule.describe()}, {rule.chosen_on}"


def threshold_notes(arms: dict, order: list[str], protocol: dict) -> dict:
    """{rule: the rule in words, unreliable: units and the sentence, fallback: units that chose
    on training scores although the protocol asked for inner out-of-fold ones}."""
    unreliable = [n for n in order if any(f.get("threshold_unreliable") for f in arms[n].get("folds", []))]
    asked_inner = isinstance(protocol.get("threshold"), dict) and protocol["threshold"].get("on") == "inner_cv"
    fallback = [n for n in order if asked_inner
                and any(f.get("threshold_on") == "training" for f in arms[n].get("folds", []))]
    return {
        "rule": threshold_words(protocol),
        "unreliable": unreliable,
        "unreliable_sentence": (f"⚠ {', '.join(unreliable)}: {UNRELIABLE_SENTENCE} (training AUROC ≥ 0.99 in at "
                                "least one fold).") if unreliable else "",
        "fallback_sentence": (f"{', '.join(fallback)}: thresholds chosen on the training part's own scores in some "
                              "folds (no inner folds: a local or federated arm, or too few patients of a class)."
                              ) if fallback else "",
    }
