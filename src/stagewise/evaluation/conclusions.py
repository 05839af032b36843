"""What the study shows, in sentences a clinician reads: `evidence["summary"]` of metrics.json.

One sentence per primary comparison and per comparison against a baseline (a score column used
without any image), and per baseline one sentence on whether any image arm beats it. Each
sentence is generated from the comparisons evidence.py computed and interpretation.py read
(the primary test, the Holm-adjusted p of every other test result, the failed comparators), so
the report only shows them:

- "beats" only when the p that applies (the primary test's own p for the primary comparison,
  else the Holm-adjusted one) is below the level and the difference is positive; "does worse
  than" when below and negative;
- "does not beat" (difference positive) or "is not shown to differ from" (otherwise) when above;
- which test and which adjustment gave that p, the difference in AUROC and its 95 % CI;
- "could not be tested" with the reason, and a comparator that failed is named as such, since
  beating it shows only that it failed.
"""

from __future__ import annotations

import math

from stagewise.evaluation.interpretation import ALPHA

TEST_WORDS = {"corrected_t": "corrected resampled t-test on fold AUROCs", "delong": "DeLong test on pooled patients",
              "wilcoxon": "Wilcoxon signed-rank test on fold AUROCs"}
SHORT = {"corrected_t": "corrected t-test", "delong": "DeLong", "wilcoxon": "Wilcoxon"}
DIFF_KEY = {"corrected_t": "mean_diff", "delong": "diff", "wilcoxon": "hl_estimate"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _name(unit: str, kinds: dict) -> str:
    """A unit as the sentence names it: baselines and the clinical model say what they are."""
    kind = kinds.get(unit)
    if kind == "baseline":
        return f"the no-image baseline {unit}"
    if kind == "clinical":
        return f"the clinical-only model {unit}"
    return unit


def _test_of(c: dict, primary: dict | None) -> str:
    """The test a comparison's sentence reads: the primary test, else corrected t, else DeLong."""
    want = primary["test"] if primary else "corrected_t"
    if c.get(want) or c.get("primary"):
        return want
    return "delong" if c.get("delong") else want


def _untestable(c: dict, test: str) -> str:
    if c.get("n_patients", 0) < 2:
        return "too few patients scored by both"
    if test == "wilcoxon" and not c.get("wilcoxon_can_reach", True):
        return (f"with {c.get('n_fold_pairs')} paired folds the Wilcoxon test cannot give p below "
                f"{c.get('wilcoxon_smallest_p', 1.0):.3f}")
    if test == "delong":
        return "the patients both scored do not include both outcomes"
    return "fewer than two folds gave both units an AUROC"


def _failed(c: dict) -> str:
    flagged = list((c.get("flagged") or {}))
    if not flagged:
        return ""
    if len(flagged) == 1:
        who = f"{flagged[0]} failed as a comparator (its out-of-fold scores rank patients the wrong way round)"
    else:
        who = (f"{' and '.join(flagged)} failed as comparators (their out-of-fold scores rank patients the wrong "
               "way round)")
    return f" This cannot be read as a finding: {who}, so the comparison shows only that."


def comparison_sentence(c: dict, kinds: dict, primary: dict | None, alpha: float = ALPHA) -> dict:
    """{a, b, primary, test, p, adjustment, verdict, text} of one comparison. `verdict` is one of
    beats, worse, not_beaten, no_difference, untested."""
    a, b = c["a"], c["b"]
    test = _test_of(c, primary)
    r = c.get(test) or {}
    is_primary = bool(c.get("primary")) and primary is not None and test == primary["test"]
    if is_primary:
        p = r.get("p")
        adjustment = "none: the primary test" + (", stated before the results" if primary.get("stated") else
                                                 " (by default the first comparison)")
        p_words = "unadjusted {p}, the primary test" + (" stated in the recipe" if primary.get("stated") else
                                                       " by default the first comparison")
    else:
        p = r.get("p_holm")
        adjustment = "Holm"
        p_words = "{p} after Holm adjustment over all the comparisons' " + SHORT[test] + " p-values"
    lead = "Primary comparison: " if c.get("primary") else ""
    out = {"a": a, "b": b, "primary": bool(c.get("primary")), "test": test, "p": p, "adjustment": adjustment}
    diff, low, high = r.get(DIFF_KEY[test]), r.get("ci_low"), r.get("ci_high")
    if not _finite(p) or not _finite(diff):
        text = (f"{lead}{_name(a, kinds)} vs {_name(b, kinds)} could not be tested "
                f"({TEST_WORDS[test]}): {_untestable(c, test)}.")
        return out | {"verdict": "untested", "text": text + _failed(c)}
    ci = f", 95 % CI {low:+.3f} to {high:+.3f}" if _finite(low) and _finite(high) else ""
    numbers = f"(difference {diff:+.3f} AUROC{ci}, {p_words.format(p=_p(p))}; {TEST_WORDS[test]})"
    if p < alpha:
        verdict, verb = ("beats", "beats") if diff > 0 else ("worse", "does worse than")
    else:
        verdict, verb = ("not_beaten", "does not beat") if diff > 0 else ("no_difference", "is not shown to differ from")
    text = f"{lead}{_name(a, kinds)} {verb} {_name(b, kinds)} {numbers}."
    if p >= alpha:
        text += f" At the {alpha:g} level this difference may be chance."
    return out | {"verdict": verdict, "text": text + _failed(c)}


def baseline_sentence(baseline: str, rows: list[dict], units_evidence: dict, alpha: float = ALPHA) -> str:
    """Whether any image arm beats one baseline, with the baseline's own pooled AUROC."""
    ci = (units_evidence.get(baseline) or {}).get("auroc_delong_ci") or {}
    own = (f" (pooled AUROC {ci['point']:.3f}, 95 % CI {ci['low']:.3f} to {ci['high']:.3f})"
           if all(_finite(ci.get(k)) for k in ("point", "low", "high")) else "")
    winners = [r["a"] for r in rows if r["verdict"] == "beats" and not r.get("flagged")]
    tested = [r for r in rows if r["verdict"] != "untested"]
    if not tested:
        return f"No image arm could be tested against the no-image baseline {baseline}{own}."
    how = ("after Holm adjustment for multiple comparisons" +
           (", the primary test unadjusted" if any(r["primary"] for r in tested) else "") + f", at p < {alpha:g}")
    if not winners:
        return (f"No image arm beats the no-image baseline {baseline}{own} {how}: what the images add over this score "
                "column alone is not shown.")
    return f"{len(winners)} of {len(tested)} image arms beat the no-image baseline {baseline}{own} {how}: {', '.join(winners)}."


def study_summary(comparisons: list[dict], units: dict, units_evidence: dict, primary: dict | None,
                  alpha: float = ALPHA) -> list[str]:
    """The sentences of `evidence["summary"]`: the primary comparison first, then per baseline
    its comparisons and whether any image arm beats it. `units` is metrics.json's `arms`."""
    kinds = {n: u.get("kind") for n, u in units.items()}
    sentences, per_baseline = [], {}
    for c in comparisons:
        is_baseline = "baseline" in (kinds.get(c["a"]), kinds.get(c["b"]))
        if not (c.get("primary") or is_baseline):
            continue
        row = comparison_sentence(c, kinds, primary, alpha) | {"flagged": bool(c.get("flagged"))}
        if c.get("primary"):
            sentences.insert(0, row["text"])
        else:
            sentences.append(row["text"])
        if kinds.get(c["b"]) == "baseline" and kinds.get(c["a"]) == "model":
            per_baseline.setdefault(c["b"], []).append(row)
    sentences += [baseline_sentence(b, rows, units_evidence, alpha) for b, rows in per_baseline.items()]
    return sentences
