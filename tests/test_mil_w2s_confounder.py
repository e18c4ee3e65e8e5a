"""Weak-to-strong correction on a cohort with a margin confounder: it must not destroy the bag
classifier, it must find the real positives through the negative bags, and its feedback must back off
when it hurts. Cohorts come from mil/simulate.py, small enough for a 2-core machine."""
import json
import logging

import numpy as np
import pytest
import torch

from mil.checkpoint import load_run
from mil.config import TrainConfig, W2SConfig
from mil.simulate import SimConfig, kind_of, make_feature_cohort
from mil.splits import make_splits
from mil.train import train_cohort, train_fold
from mil.w2s import negative_evidence, student_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIM = SimConfig(n_slides=60, dim=64, grid=(10, 14))
MODEL = {"hidden": 64, "attn_hidden": 32}


def logits_from(z: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.zeros_like(z), z], -1)


@pytest.fixture(scope="module")
def confounded():
    return make_feature_cohort(SIM, seed=1, with_kinds=True)


def test_simulated_cohort_has_a_margin_confounder_commoner_in_tumour_slides(confounded):
    cohort, kinds = confounded
    share = {y: {k: [] for k in ("tumour", "confounder", "mimic")} for y in (0, 1)}
    for b, k in zip(cohort.bags, kinds):
        kk = kind_of(k)
        assert len(kk) == len(b.features) == len(b.coords) == len(b.instance_labels)
        assert ((kk == "tumour") == (b.instance_labels > 0.5)).all()
        for t in share[b.label]:
            share[b.label][t].append(float((kk == t).mean()))
    mean = {y: {t: np.mean(v) for t, v in d.items()} for y, d in share.items()}
    assert mean[0]["tumour"] == 0 and 0.005 <= mean[1]["tumour"] <= 0.05
    assert mean[1]["confounder"] > 3 * mean[0]["confounder"] > 0      # commoner in tumour slides, not only there
    assert mean[0]["mimic"] > 0 and mean[1]["mimic"] > 0
    again = make_feature_cohort(SIM, seed=1)
    assert all(np.array_equal(a.features, b.features) for a, b in zip(cohort.bags, again.bags))


def test_negative_bag_evidence_separates_tumour_from_the_confounder(confounded):
    cohort, kinds = confounded
    feats = [b.features for b in cohort.bags]
    e, info = negative_evidence(feats, [b.label for b in cohort.bags], k=5, max_refs=2000)
    assert info["computed"] and info["refs_positive"] <= 2000 and info["refs_negative"] <= 2000
    ev = {t: np.concatenate([ei[kind_of(k) == t] for ei, k, b in zip(e, kinds, cohort.bags) if b.label == 1])
          for t in ("tumour", "confounder", "normal", "mimic")}
    assert all(not ei.any() for ei, b in zip(e, cohort.bags) if b.label == 0)   # negative bags: 0
    assert np.median(ev["tumour"]) > 0.8
    for t in ("confounder", "normal", "mimic"):
        assert np.median(ev[t]) < 0.2, t
    # Without negative bags the evidence has no null: nothing is computed, nothing is gated.
    none, info = negative_evidence(feats[:3], [1, 1, 1])
    assert not info["computed"] and all(not x.any() for x in none)


def test_evidence_gates_the_teacher_and_vouches_for_what_attention_missed():
    # Instance 0: attended (t = 1) but explained by the negative bags (e = 0): a confounder.
    # Instance 1: ignored by the attention (t = 0) but unexplained (e = 1): the tumour.
    att = torch.tensor([[0.9, 0.0, 0.1]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    e = torch.tensor([[0.0, 1.0, 0.0]])
    z = torch.zeros(1, 3, requires_grad=True)
    student_loss(logits_from(z), att, mask, torch.tensor([1]), 0.0, evidence=e).backward()
    assert z.grad[0, 0] > 0 and z.grad[0, 1] < 0 and z.grad[0, 2] > 0
    z2 = torch.zeros(1, 3, requires_grad=True)
    student_loss(logits_from(z2), att, mask, torch.tensor([1]), 0.0).backward()
    assert z2.grad[0, 0] < 0                                   # without evidence: the confounder is taught as tumour


def _cv(cohort, w2s: W2SConfig | None, epochs: int = 16):
    """Three folds on the same splits; per fold (bag AUC, student instance AUC, FoldResult)."""
    out = []
    for split in make_splits(cohort, 3, val_fraction=0.2, seed=0):
        cfg = TrainConfig(model="abmil", model_kwargs=MODEL, epochs=epochs, batch_size=4, lr=1e-3, min_epochs=4,
                          patience=100, device="cpu", w2s=w2s or W2SConfig(enabled=False))
        _, r = train_fold(cohort, split, cfg, progress=False)
        out.append((r.metrics["auc"], r.instance["student"]["auc"], r))
    return out


@pytest.fixture(scope="module")
def naive_runs(confounded):
    return _cv(confounded[0], None)


def test_w2s_keeps_the_bag_auc_and_finds_the_tumour_despite_the_confounder(confounded, naive_runs):
    cohort, _ = confounded
    w2s = _cv(cohort, W2SConfig())
    bag0, inst0 = np.mean([r[0] for r in naive_runs]), np.mean([r[1] for r in naive_runs])
    bag1, inst1 = np.mean([r[0] for r in w2s]), np.mean([r[1] for r in w2s])
    spread = max(np.std([r[0] for r in naive_runs]), 0.03)
    assert bag1 >= bag0 - spread, (bag0, bag1)                 # the bag classifier survives
    assert inst1 >= inst0 + 0.03 and inst1 > 0.9, (inst0, inst1)   # the student finds the tumour
    for *_, r in w2s:
        assert r.w2s["evidence"]["computed"] and set(r.w2s) >= {"feedback", "distillation", "backoff"}


def test_harmful_filtering_backs_off_says_so_and_keeps_the_bag_auc(confounded, naive_runs, monkeypatch, tmp_path,
                                                                   caplog):
    """A student forced to be wrong: the filter keeps only each bag's `min_keep` instances it scores
    *lowest*, hiding every tumour tile from the bag branch. Without the back-off that destroys the bag
    classifier; with it, the run turns the filtering off, says when and why, and keeps its AUC."""
    import mil.w2s as w2s_mod

    def worst_instances(instance_logits, mask, reject_below, min_keep, negative=0):
        p = torch.sigmoid(w2s_mod.positive_logit(instance_logits.detach(), negative))
        low = torch.where(mask, -p, torch.full_like(p, -2.0)).topk(min(min_keep, p.shape[1]), dim=1).indices
        return torch.zeros_like(mask).scatter_(1, low, True) & mask

    monkeypatch.setattr(w2s_mod, "keep_mask", worst_instances)
    cohort, _ = confounded
    bad = W2SConfig(min_keep=4, distill_weight=0.0)
    no_backoff = _cv(cohort, W2SConfig(min_keep=4, distill_weight=0.0, backoff_tol=1e9))
    assert np.mean([r[0] for r in no_backoff]) < np.mean([r[0] for r in naive_runs]) - 0.15   # the case is harmful

    cfg = TrainConfig(model="abmil", model_kwargs=MODEL, epochs=16, batch_size=4, lr=1e-3, min_epochs=4, patience=100,
                      folds=3, val_fraction=0.2, device="cpu", w2s=bad)
    with caplog.at_level(logging.WARNING, logger="mil.train"):
        m = train_cohort(cohort, cfg, tmp_path / "run", instance_labels="tumor", progress=False)
    assert m["w2s_feedback"] == [False, False, False]
    assert all(b and b[0]["turned_off"] == "all feedback" and "with the student's feedback vs" in b[0]["reason"]
               for b in m["w2s_backoff"]), m["w2s_backoff"]
    assert sum("w2s all feedback turned off at epoch" in r.message for r in caplog.records) == 3
    assert m["bag_auc"]["mean"] >= np.mean([r[0] for r in naive_runs]) - max(np.std([r[0] for r in naive_runs]), 0.05)
    saved = json.loads((tmp_path / "run" / "fold_0" / "result.json").read_text())
    assert saved["w2s"]["feedback"] is False and saved["w2s"]["backoff"][0]["epoch"] >= 0
    _, models = load_run(tmp_path / "run")
    assert all(model.reject_below is None for model in models)   # predicts without the filter, as chosen
