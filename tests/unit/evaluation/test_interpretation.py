"""How the evidence may be read: failed comparators flagged, one primary test, Holm for the rest,
Wilcoxon only where the folds let it reach significance."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from conftest import small_recipe
from stagewise.study.preflight import comparison_problems
from stagewise.evaluation.evidence import compute_evidence
from stagewise.evaluation.interpretation import wilcoxon_smallest_p
from stagewise.evaluation.statistics import wilcoxon_test
from stagewise.report.wording import comparison_rows

ARM = {"name": "good", "backbone": "scratch:tinycnn", "stages": [{"kind": "probe", "epochs": 1}]}


def _study(n_folds: int, seed: int = 0):
    """Three model units on the same folds: a good one, a noisy one and one that ranks
    patients backwards (AUROC CI below 0.5, negative calibration slope)."""
    rng = np.random.default_rng(seed)
    n = 40 * n_folds
    y = rng.permutation(np.arange(n) % 2)
    fold = np.arange(n) % n_folds
    logits = {"good": 2.5 * (y - 0.5) + rng.normal(0, 1, n), "noisy": 0.8 * (y - 0.5) + rng.normal(0, 1, n)}
    logits["backwards"] = -logits["good"] + rng.normal(0, 0.3, n)
    rows, units = [], {}
    for name, z in logits.items():
        prob = 1 / (1 + np.exp(-z))
        rows.append(pd.DataFrame({"arm": name, "repeat": 0, "fold": fold, "patient": np.arange(n), "y": y, "prob": prob}))
        folds = []
        for k in range(n_folds):
            m = fold == k
            folds.append({"repeat": 0, "fold": k, "auroc": roc_auc_score(y[m], prob[m]), "threshold": 0.5,
                          "n_train_patients": int((~m).sum()), "n_test_patients": int(m.sum())})
        units[name] = {"kind": "model", "label_fraction": 1.0, "base_arm": name, "folds": folds,
                       "summary": {"auroc": {"mean": float(np.mean([f["auroc"] for f in folds])), "sd": 0.0}}}
    return {"arms": units}, pd.concat(rows, ignore_index=True)


def _recipe(**evaluation):
    return small_recipe("cohort.csv", [ARM, {**ARM, "name": "noisy"}, {**ARM, "name": "backwards"}],
                        evaluation={"bootstrap": 0, **evaluation})


@pytest.fixture(scope="module")
def five_folds():
    metrics, preds = _study(5)
    return compute_evidence(_recipe(), metrics, preds)


def test_a_comparator_ranking_backwards_is_flagged_next_to_every_comparison_using_it(five_folds):
    ev = five_folds
    assert ev["units"]["good"]["flags"] == [] and ev["units"]["noisy"]["flags"] == []
    codes = [f["code"] for f in ev["units"]["backwards"]["flags"]]
    assert codes == ["auroc_below_chance", "negative_calibration_slope"]
    assert ev["units"]["backwards"]["auroc_delong_ci"]["high"] < 0.5
    assert ev["units"]["backwards"]["calibration"]["slope"] < 0
    for c in ev["comparisons"]:
        assert ("backwards" in c["flagged"]) == ("backwards" in (c["a"], c["b"]))
    rows = comparison_rows(ev["comparisons"], ev["primary"])
    flagged = [r for r in rows if "backwards" in (r["a"], r["b"])]
    assert flagged and all("worse than chance" in r["flags"][0]["text"] for r in flagged)


def test_primary_is_the_first_comparison_by_default_and_only_it_is_coloured_the_rest_holm_adjusted(five_folds):
    ev = five_folds
    assert ev["primary"] == {"a": "noisy", "b": "good", "test": "corrected_t", "stated": False}
    comps = ev["comparisons"]
    assert [c["primary"] for c in comps] == [True, False]
    assert "p_holm" not in comps[0]["corrected_t"]  # the primary test itself is not adjusted
    for test in ("delong", "corrected_t"):  # every other p of a test, Holm over its family
        family = [c[test] for c in comps if test in c and not (c["primary"] and test == "corrected_t")]
        expect = multipletests([r["p"] for r in family], method="holm")[1]
        assert [r["p_holm"] for r in family] == pytest.approx(list(expect))
    # a DeLong p far below 0.05 beside the primary t: never coloured
    rows = comparison_rows(comps, ev["primary"])
    assert comps[1]["delong"]["p"] < 0.05 and not any(r["delong"]["sig"] for r in rows)
    assert all(not r["t"]["sig"] for r in rows[1:])


def test_the_recipe_names_the_primary_comparison_and_test():
    metrics, preds = _study(5)
    ev = compute_evidence(_recipe(primary={"a": "good", "b": "backwards", "test": "delong"}), metrics, preds)
    assert ev["primary"]["stated"] and (ev["comparisons"][0]["a"], ev["comparisons"][0]["b"]) == ("good", "backwards")
    rows = comparison_rows(ev["comparisons"], ev["primary"])
    assert rows[0]["delong"]["sig"] and rows[0]["delong"]["holm"] == ""  # p < 0.001, the stated test
    assert not rows[0]["t"]["sig"] and rows[0]["t"]["holm"]
    problems = comparison_problems(_recipe(primary={"a": "good", "b": "imagenet"}))
    assert problems == ["evaluation.primary names unknown unit(s) ['imagenet']; this study has "
                        "['good', 'noisy', 'backwards']"]


def test_wilcoxon_is_shown_only_where_the_folds_let_it_reach_significance(five_folds):
    assert wilcoxon_smallest_p(5) == 0.0625 and wilcoxon_smallest_p(6) == 0.03125
    # the bound is the exact test's: five differences of one sign give scipy's p = 0.0625
    assert wilcoxon_test([0.9, 0.8, 0.85, 0.7, 0.95], [0.5, 0.6, 0.55, 0.6, 0.5])["p"] == pytest.approx(0.0625)
    for n_folds, shown in ((5, False), (8, True)):
        ev = five_folds if n_folds == 5 else compute_evidence(_recipe(), *_study(n_folds))
        c = ev["comparisons"][0]
        assert c["wilcoxon_can_reach"] is shown and c["n_fold_pairs"] == n_folds
        row = comparison_rows([c], ev["primary"])[0]
        assert (row["w"]["p"] != "\u2014") is shown
        assert ("can never reach p < 0.05" in row["w_note"]) is (not shown)
