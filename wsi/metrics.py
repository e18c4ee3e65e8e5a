"""ROC AUC, the one definition every package reports (scikit-learn's `roc_auc_score` underneath).

    binary_auc(truth, scores)      # positives (bool or 0/1) against scores; NaN with one kind only
    class_aucs(y, probs)           # one-vs-rest AUC of each class column (NaN where undefined)
    macro_auc(y, probs)            # binary: the last column's AUC; more classes: the mean one-vs-rest
                                   # AUC over the classes that are present (and not alone)

Undefined values are NaN, never a warning or an exception: a validation fold or a slide set with
one class is an ordinary event, and callers say what it means.
"""
from __future__ import annotations

import numpy as np

__all__ = ["binary_auc", "class_aucs", "macro_auc"]


def binary_auc(truth, scores) -> float:
    """AUC of `scores` (n,) for the positives of `truth` (n,: bool, or 0/1); NaN unless both kinds occur."""
    from sklearn.metrics import roc_auc_score

    t = np.asarray(truth).astype(bool).reshape(-1)
    if t.all() or not t.any():
        return float("nan")
    return float(roc_auc_score(t, np.asarray(scores).reshape(-1)))


def class_aucs(y, probs) -> list[float]:
    """One-vs-rest AUC of each class c: probs[:, c] of the items of class c against all others (NaN
    when class c, or every other class, is absent). y: (n,) class indices; probs: (n, C)."""
    y, probs = np.asarray(y), np.asarray(probs)
    return [binary_auc(y == c, probs[:, c]) for c in range(probs.shape[1])]


def macro_auc(y, probs) -> float:
    """The AUC of class probabilities (n, C) against class indices (n,): binary (C = 2), the AUC of the
    last class; more classes, the macro one-vs-rest AUC over the classes present (equal to sklearn's
    `multi_class="ovr"` when all are present). NaN when fewer than two classes occur."""
    y, probs = np.asarray(y), np.asarray(probs)
    if len(np.unique(y)) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return binary_auc(y == 1, probs[:, 1])
    return float(np.nanmean(class_aucs(y, probs)))
