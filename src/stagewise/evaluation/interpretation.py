"""How the evidence may be read: failed comparators, the primary test, multiplicity.

The numbers of evidence.py are right whatever they say; a reviewer still asks what they
support. Three questions are answered here, as values of metrics.json, so the report only
states them:

- `unit_flags`: a unit whose pooled AUROC CI lies wholly below 0.5, or whose calibration
  slope is negative, ranks test patients the wrong way round. Beating such a comparator shows
  only that it failed, so every comparison using it carries the flag.
- `interpret_comparisons`: one comparison and one test are primary (named in the recipe, else
  the first comparison with the corrected resampled t-test, since a claim about a training
  procedure is a claim across folds); every other p-value is Holm-adjusted within its test
  (statsmodels' `multipletests`), so a list of comparisons is not read as a list of findings.
- `wilcoxon_smallest_p`: with n paired folds the exact two-sided signed-rank test cannot go
  below 2 / 2^n (0.0625 for 5 folds); a Wilcoxon p that can never reach the level is not shown
  as if it could.
"""

from __future__ import annotations

import numpy as np
from statsmodels.stats.multitest import multipletests

TESTS = ("delong", "corrected_t", "wilcoxon")
ALPHA = 0.05


def unit_flags(evidence: dict) -> list[dict]:
    """The reasons a unit's scores cannot serve as a working comparator (empty: none)."""
    flags = []
    ci = evidence.get("auroc_delong_ci") or {}
    if ci.get("high") is not None and ci["high"] < 0.5:
        flags.append({"code": "auroc_below_chance", "point": ci["point"], "low": ci["low"], "high": ci["high"]})
    slope = (evidence.get("calibration") or {}).get("slope")
    if slope is not None and np.isfinite(slope) and slope < 0:
        flags.append({"code": "negative_calibration_slope", "slope": slope})
    return flags


def wilcoxon_smallest_p(n: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give with n nonzero paired
    differences: every difference of one sign, probability 2 / 2^n."""
    return float(min(1.0, 2.0 / 2.0 ** n)) if n > 0 else 1.0


def primary_choice(pairs: list[tuple[str, str]], primary) -> dict | None:
    """The primary comparison {a, b, test, stated}: the recipe's `evaluation.primary`, else
    the first comparison with the corrected resampled t-test (stated False)."""
    if primary is not None:
        return {"a": primary.a, "b": primary.b, "test": primary.test, "stated": True}
    if pairs:
        return {"a": pairs[0][0], "b": pairs[0][1], "test": "corrected_t", "stated": False}
    return None


def interpret_comparisons(comparisons: list[dict], units: dict, primary: dict | None) -> None:
    """Mark, in place, the primary comparison, the flagged units of each comparison, whether
    its Wilcoxon test can reach p < 0.05, and the Holm-adjusted p (`p_holm`) of every test
    result except the primary one."""
    family: dict[str, list[dict]] = {t: [] for t in TESTS}
    for c in comparisons:
        c["primary"] = primary is not None and (c["a"], c["b"]) == (primary["a"], primary["b"])
        c["flagged"] = {u: units[u]["flags"] for u in (c["a"], c["b"]) if units.get(u, {}).get("flags")}
        n = c.get("n_fold_pairs", 0)
        c["wilcoxon_smallest_p"] = wilcoxon_smallest_p(n)
        c["wilcoxon_can_reach"] = c["wilcoxon_smallest_p"] < ALPHA
        for test in TESTS:
            result = c.get(test)
            if result and np.isfinite(result.get("p", np.nan)) and not (c["primary"] and test == primary["test"]):
                family[test].append(result)
    for results in family.values():
        if results:
            adjusted = multipletests([r["p"] for r in results], alpha=ALPHA, method="holm")[1]
            for r, p in zip(results, adjusted):
                r["p_holm"] = float(p)
