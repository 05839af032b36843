"""The cross-site matrix of a fold: each site's own model scored on every site's test
patients (one row per site model, one column per site; the diagonal is each site's model on
its own patients, the per-site figures of the arm). A local arm has it for free (every model
is in the driver); a federated arm with personalised or site-kept groups has it only under
`sites.cross_site_evaluation`, from the scores its sites returned (`federated.cross_site`).
Both are summarised over folds the same way (`mean_matrix`), and the report shows both in
the same shape.
"""

from __future__ import annotations

import numpy as np

from stagewise.evaluation.metrics import patient_auroc


def federated_matrix(site_names: list[str], order: list[np.ndarray], scores: dict, cross_scores: dict,
                     test: np.ndarray, y: np.ndarray, patients: np.ndarray, how: str) -> dict:
    """A federated fold's matrix: `order[b]` the cohort rows site b scored, `scores[b]` its own
    final model's probabilities on them (the diagonal, exactly the scores of the arm's
    per-site figures), `cross_scores[(a, b)]` site a's model's on the same rows."""
    matrix: dict[str, dict[str, float]] = {name: {} for name in site_names}
    for b, rows in enumerate(order):
        tested = np.isin(rows, test)
        if not tested.any():
            continue
        for a, name in enumerate(site_names):
            prob = scores[b] if a == b else cross_scores[(a, b)]
            matrix[name][site_names[b]] = patient_auroc(np.asarray(prob)[tested, 0], rows[tested], y, patients, how)
    return matrix


def mean_matrix(matrices: list[dict]) -> dict:
    """Each entry's mean over the folds that have it (undefined AUROCs left out; None where no
    fold has one): the summary of a unit's per-fold matrices."""
    pairs = {(a, b) for m in matrices for a, row in m.items() for b in row}
    out: dict[str, dict] = {}
    for a, b in sorted(pairs):
        vals = [m[a][b] for m in matrices if b in m.get(a, {})]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        out.setdefault(a, {})[b] = float(np.mean(vals)) if vals else None
    return out
