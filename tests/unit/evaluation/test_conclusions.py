"""evidence["summary"]: the plain conclusion of each primary and baseline comparison."""

from stagewise.evaluation.conclusions import comparison_sentence, study_summary

UNITS = {"cnn": {"kind": "model"}, "ssl": {"kind": "model"}, "baseline:view": {"kind": "baseline"}}
EVIDENCE = {"baseline:view": {"auroc_delong_ci": {"point": 0.734, "low": 0.65, "high": 0.81}, "flags": []},
            "cnn": {"flags": []}, "ssl": {"flags": []}}
PRIMARY = {"a": "ssl", "b": "cnn", "test": "corrected_t", "stated": True}


def comparison(a, b, diff, p, p_holm=None, primary=False, **extra):
    t = {"mean_diff": diff, "ci_low": diff - 0.15, "ci_high": diff + 0.15, "p": p}
    if p_holm is not None:
        t["p_holm"] = p_holm
    d = {"diff": diff, "ci_low": diff - 0.1, "ci_high": diff + 0.1, "p": p / 2, "p_holm": p}
    return {"a": a, "b": b, "n_patients": 80, "n_fold_pairs": 5, "primary": primary, "flagged": {},
            "corrected_t": t, "delong": d, **extra}


def test_holm_p_above_level_does_not_beat_the_baseline():
    c = comparison("cnn", "baseline:view", 0.105, 0.04, p_holm=0.202)
    row = comparison_sentence(c, {n: u["kind"] for n, u in UNITS.items()}, PRIMARY)
    assert row["verdict"] == "not_beaten" and row["adjustment"] == "Holm" and row["p"] == 0.202
    assert "cnn does not beat the no-image baseline baseline:view" in row["text"]
    assert "+0.105 AUROC" in row["text"] and "p = 0.202 after Holm adjustment" in row["text"]
    assert "beats" not in row["text"]


def test_holm_p_below_level_beats():
    c = comparison("cnn", "baseline:view", 0.2, 0.001, p_holm=0.004)
    row = comparison_sentence(c, {n: u["kind"] for n, u in UNITS.items()}, PRIMARY)
    assert row["verdict"] == "beats"
    assert "cnn beats the no-image baseline baseline:view (difference +0.200 AUROC, 95 % CI +0.050 to +0.350, " \
           "p = 0.004 after Holm adjustment" in row["text"]


def test_negative_difference_is_not_shown_to_differ_and_a_significant_one_is_worse():
    kinds = {n: u["kind"] for n, u in UNITS.items()}
    assert "is not shown to differ from" in comparison_sentence(comparison("cnn", "baseline:view", -0.02, 0.5, 0.9),
                                                                 kinds, PRIMARY)["text"]
    assert comparison_sentence(comparison("cnn", "baseline:view", -0.3, 0.001, 0.002), kinds, PRIMARY)["verdict"] == "worse"


def test_primary_comparison_reads_its_own_unadjusted_p_first():
    comps = [comparison("ssl", "cnn", 0.05, 0.3, primary=True),
             comparison("cnn", "baseline:view", 0.105, 0.04, p_holm=0.202),
             comparison("ssl", "baseline:view", 0.08, 0.05, p_holm=0.3)]
    summary = study_summary(comps, UNITS, EVIDENCE, PRIMARY)
    assert summary[0].startswith("Primary comparison: ssl does not beat cnn")
    assert "unadjusted p = 0.300, the primary test stated in the recipe;" in summary[0]
    assert summary[-1].startswith("No image arm beats the no-image baseline baseline:view (pooled AUROC 0.734, 95 % CI 0.650 "
                                  "to 0.810) after Holm adjustment")
    assert len(summary) == 4


def test_untestable_and_failed_comparator_are_said():
    kinds = {n: u["kind"] for n, u in UNITS.items()}
    c = comparison("cnn", "baseline:view", 0.1, 0.01, p_holm=0.02)
    del c["corrected_t"], c["delong"]
    row = comparison_sentence(c, kinds, PRIMARY)
    assert row["verdict"] == "untested" and "could not be tested" in row["text"]
    c = comparison("cnn", "baseline:view", 0.4, 0.001, p_holm=0.002, flagged={"baseline:view": [{"code": "auroc_below_chance"}]})
    assert "baseline:view failed as a comparator" in comparison_sentence(c, kinds, PRIMARY)["text"]
    summary = study_summary([c], UNITS, EVIDENCE, PRIMARY)
    assert summary[-1].startswith("No image arm beats")  # beating a failed comparator is no win


def test_recipe_level_replaces_005():
    c = comparison("cnn", "baseline:view", 0.2, 0.01, p_holm=0.02)
    kinds = {n: u["kind"] for n, u in UNITS.items()}
    assert comparison_sentence(c, kinds, PRIMARY, alpha=0.01)["verdict"] == "not_beaten"
