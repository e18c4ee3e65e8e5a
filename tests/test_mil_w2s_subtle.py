"""Weak-to-strong correction when the tumour is a subtle shift of a common normal tissue and a
confounder of both classes solves the bag task (mil/simulate.py `SimConfig.subtle`): the contrast
evidence (mil/contrast.py) must see the shift, and the student must beat the inheritance baseline."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mil.config import TrainConfig, W2SConfig
from mil.contrast import contrast_evidence, neighbourhood_mean
from mil.simulate import SimConfig, kind_of, make_feature_cohort
from mil.splits import make_splits
from mil.train import train_fold
from mil.w2s import negative_evidence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIM = SimConfig.subtle(n_slides=96, dim=64, grid=(10, 14))
MODEL = {"hidden": 64, "attn_hidden": 32}


@pytest.fixture(scope="module")
def subtle():
    return make_feature_cohort(SIM, seed=0, with_kinds=True)


def test_neighbourhood_mean_averages_the_tiles_around_each_tile():
    f = np.arange(4, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    coords = np.array([[0, 0], [256, 0], [0, 256], [1024, 1024]])   # three neighbours and one far away
    m = neighbourhood_mean(f, coords, radius=1)
    assert np.allclose(m[:3, 0], 1.0) and m[3, 0] == 3.0
    assert np.array_equal(neighbourhood_mean(f, None), f) and np.array_equal(neighbourhood_mean(f, coords, 0), f)


def test_contrast_sees_the_subtle_tumour_the_knn_evidence_misses(subtle):
    cohort, kinds = subtle
    feats, labels = [b.features for b in cohort.bags], [b.label for b in cohort.bags]
    e, info = contrast_evidence(feats, labels, [b.coords for b in cohort.bags], max_refs=8000, seed=0)
    knn, _ = negative_evidence(feats, labels, max_refs=2000)
    assert info["computed"] and info["calibration_bags"] >= 1 and info["refs_positive"] <= 8000
    assert all(not x.any() for x, y in zip(e, labels) if y == 0)   # negative bags: 0

    truth = np.concatenate([b.instance_labels for b in cohort.bags if b.label == 1])
    kind = np.concatenate([kind_of(k) for k, b in zip(kinds, cohort.bags) if b.label == 1])

    def auc(ev):   # tumour against the rest of the positive bags
        return roc_auc_score(truth, np.concatenate([x for x, y in zip(ev, labels) if y == 1]))

    contrast = np.concatenate([x for x, y in zip(e, labels) if y == 1])
    assert auc(e) > 0.75 and auc(e) > auc(knn) + 0.15                # the contrast sees the shift, k-NN does not
    assert contrast[kind == "tumour"].mean() > 3 * contrast[kind == "normal"].mean()
    again, _ = contrast_evidence(feats, labels, [b.coords for b in cohort.bags], max_refs=8000, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(e, again))       # seeded


def _fold(cohort, split, w2s: W2SConfig):
    cfg = TrainConfig(model="abmil", model_kwargs=MODEL, epochs=10, batch_size=4, lr=1e-3, min_epochs=4,
                      patience=100, device="cpu", w2s=w2s)
    return train_fold(cohort, split, cfg, progress=False)[1]


def test_w2s_student_beats_the_inheritance_baseline_and_keeps_the_bag_auc(subtle):
    cohort, _ = subtle
    split = make_splits(cohort, 3, val_fraction=0.2, seed=0)[0]
    plain = _fold(cohort, split, W2SConfig(enabled=False))
    w2s = _fold(cohort, split, W2SConfig())
    base = w2s.instance["baseline"]["auc"]
    # the k-NN evidence alone gets this student about 0.07 over the baseline here; with the contrast, 0.11
    assert w2s.instance["student"]["auc"] >= base + 0.1, (w2s.instance, base)
    assert w2s.instance["student"]["auc"] >= plain.instance["student"]["auc"] + 0.1
    # one fold of 32 test slides: a bag AUC within 0.1 of the plain run's (the 3-seed benchmark holds it level)
    assert w2s.metrics["auc"] >= plain.metrics["auc"] - 0.1, (plain.metrics, w2s.metrics)
    assert w2s.w2s["evidence"]["used"] == "both" and w2s.w2s["evidence"]["contrast"]["computed"] and w2s.w2s["evidence"]["prefit"]["steps"] > 0
