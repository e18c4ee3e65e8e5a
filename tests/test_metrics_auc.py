"""wsi.metrics: the one ROC AUC that mil and clip report, on scikit-learn's roc_auc_score."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from wsi.metrics import binary_auc, class_aucs, macro_auc


def test_binary_multiclass_and_undefined():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = rng.random(40)
    probs2 = np.stack([1 - p, p], 1)
    assert macro_auc(y, probs2) == binary_auc(y, p) == pytest.approx(roc_auc_score(y, p))
    y3 = np.arange(60) % 3
    probs3 = rng.dirichlet(np.ones(3), 60)
    assert macro_auc(y3, probs3) == pytest.approx(roc_auc_score(y3, probs3, multi_class="ovr"))
    # a class absent: the mean over the classes present, its own AUC NaN
    y_missing = np.where(y3 == 2, 0, y3)
    per = class_aucs(y_missing, probs3)
    assert math.isnan(per[2]) and macro_auc(y_missing, probs3) == pytest.approx(np.mean(per[:2]))
    assert math.isnan(macro_auc(np.zeros(5, int), probs3[:5])) and math.isnan(binary_auc([1, 1], [0.2, 0.3]))


def test_mil_and_clip_report_the_same_auc():
    from clip.zeroshot import zeroshot_metrics
    from mil.metrics import bag_metrics

    rng = np.random.default_rng(1)
    for n_classes, y in ((2, rng.integers(0, 2, 30)), (3, np.arange(30) % 3), (3, np.arange(30) % 2)):
        probs = rng.dirichlet(np.ones(n_classes), len(y)).astype(np.float32)
        names = [f"c{i}" for i in range(n_classes)]
        assert bag_metrics(y, probs)["auc"] == zeroshot_metrics(y, probs, names)["auc"] == macro_auc(y, probs)
