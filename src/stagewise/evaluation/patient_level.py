"""Patient-level out-of-fold scores: each patient's image scores aggregated as the protocol
says within each fold, then the mean over repeats (each repeat tests every patient once), with
the majority of the per-fold decisions. Kept apart from `evidence` so that the subgroup figures
(`subgroups`) aggregate a part of the images exactly as the whole study does."""

from __future__ import annotations

import pandas as pd

from stagewise.evaluation.recalibration import recalibrated_scores


def patient_table(predictions: pd.DataFrame, units: dict, how: str, recalibrate: bool = False) -> pd.DataFrame:
    """One row per (unit, patient): y, mean score over repeats, majority decision. With
    `recalibrate`, each fold's patient scores pass through the recalibration the fold fitted
    on its training part (evaluation/recalibration.py) before the mean over repeats; the
    decisions stay those of the raw scores at the fold's threshold, which the map preserves."""
    p = predictions.dropna(subset=["prob"])
    agg = {"mean": "mean", "max": "max", "first": "first"}[how]
    per_fold = p.groupby(["arm", "repeat", "fold", "patient"], sort=False).agg(y=("y", "first"), score=("prob", agg)).reset_index()
    thresholds = pd.DataFrame(
        [{"arm": name, "repeat": f["repeat"], "fold": f["fold"], "threshold": f["threshold"]}
         for name, u in units.items() for f in u["folds"]]
    )
    per_fold = per_fold.merge(thresholds, on=["arm", "repeat", "fold"], how="left")
    per_fold["decision"] = (per_fold["score"] >= per_fold["threshold"]).astype(float)
    if recalibrate:
        per_fold["score"] = recalibrated_scores(per_fold, units)
    return per_fold.groupby(["arm", "patient"], sort=False).agg(
        y=("y", "first"), score=("score", "mean"), decision=("decision", "mean")
    ).reset_index()
