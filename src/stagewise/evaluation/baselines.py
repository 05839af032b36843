"""Non-image predictors evaluated on the same folds as the model arms.

A routine clinical score (an IRDS grade, gestational age) is the bar an imaging model has
to clear, and a logistic regression on the clinical columns shows what the image adds.
Both are fitted or oriented on the training part of each fold only.
"""

from __future__ import annotations

import numpy as np
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def baseline_scores(values: np.ndarray, y: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, int]:
    """The score column, sign-flipped when on the training rows lower values mean positive.

    Returns (scores for all rows, direction +1/-1); rows with a missing value stay NaN.
    """
    v, yt = values[train], y[train]
    ok = ~np.isnan(v)
    direction = 1
    if len(np.unique(yt[ok])) == 2 and roc_auc_score(yt[ok], v[ok]) < 0.5:
        direction = -1
    return direction * values, direction


def fold_standardize(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Median imputation and z-scores fitted on the training rows only, applied to all rows:
    no statistic of a test patient reaches the model."""
    scaler = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler())
    scaler.fit(x[train])
    return scaler.transform(x)


def clinical_model_scores(x: np.ndarray, y: np.ndarray, patients: np.ndarray, train: np.ndarray, seed: int) -> np.ndarray:
    """Logistic regression on clinical columns, imputed and scaled inside the training part.

    Fitted on one row per training patient (the first image's values), so a patient with
    many images does not weigh more; returns a probability for every row.
    """
    _, first = np.unique(patients[train], return_index=True)
    rows = train[np.sort(first)]
    model = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        StandardScaler(),
        LogisticRegression(max_iter=1000, random_state=seed),
    )
    model.fit(x[rows], y[rows])
    return model.predict_proba(x)[:, 1]
