"""Training, cross-validation, run folders and the `mil` command line, on small separable cohorts."""
import json

import numpy as np
import pytest
import torch

from mil.data import Bag, Cohort, Split
from mil.train import TrainConfig, train_cohort, train_fold
from mil.w2s import W2SConfig

DIM = 16
SMALL = {"abmil": {"hidden": 32, "attn_hidden": 16}, "clam-sb": {"hidden": 32, "attn_hidden": 16, "k_sample": 4},
         "dsmil": {}, "transmil": {"hidden": 32, "heads": 2, "dim_head": 16, "num_landmarks": 8}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def separable_bags(n_bags: int = 24, seed: int = 0, witness: float = 0.2) -> list[Bag]:
    """Bags of 20-60 Gaussian instances; a positive bag holds ~20% witnesses shifted on 4 dims."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        n = int(rng.integers(20, 61))
        label = (i // 2) % 2                 # slides 2k and 2k+1 share a label (and, for i < 8, a patient)
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        inst = np.zeros(n, np.float32)
        if label:
            k = max(2, int(witness * n))
            idx = rng.choice(n, k, replace=False)
            x[idx, :4] += 2.5
            inst[idx] = 1.0
        bags.append(Bag(f"s{i:02d}", f"p{i // 2:02d}" if i < 8 else f"p{i:02d}", label, x,
                        rng.integers(0, 10_000, (n, 2)), inst))
    return bags


def cohort(bags=None) -> Cohort:
    return Cohort(bags=bags or separable_bags(), class_names=["normal", "tumor"], positive_class="tumor",
                  encoder="toy", source="test")


@pytest.mark.parametrize("model", ["abmil", "clam-sb", "dsmil", "transmil"])
def test_each_model_separates_a_small_cohort(model):
    c = cohort(separable_bags(40))
    split = Split(0, train=list(range(24)), val=list(range(24, 28)), test=list(range(28, 40)))
    cfg = TrainConfig(model=model, model_kwargs=SMALL[model], epochs=25, batch_size=8, lr=1e-3, min_epochs=5,
                      device="cpu")
    _, res = train_fold(c, split, cfg, progress=False)
    assert res.metrics["auc"] >= 0.9, res.metrics
    assert len(res.test_ids) == 12 and np.allclose(np.array(res.test_probs).sum(1), 1, atol=1e-5)
    assert res.instance["student"]["auc"] > 0.8 and res.instance["attention"] is not None


def test_run_folder_metrics_and_resume(tmp_path, monkeypatch):
    c = cohort()
    cfg = TrainConfig(model="abmil", model_kwargs=SMALL["abmil"], epochs=6, batch_size=8, lr=1e-3, folds=3,
                      min_epochs=2, device="cpu", w2s=W2SConfig(warmup=1, ramp=2))
    m = train_cohort(c, cfg, tmp_path / "run", instance_labels="tumor", progress=False)
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("bag_auc", "instance_auc", "positive_class", "model", "w2s"):
        assert key in saved
    assert saved == json.loads(json.dumps(m))
    assert saved["positive_class"] == "tumor" and saved["model"] == "abmil" and saved["w2s"] is True
    assert set(saved["bag_auc"]) == {"mean", "std", "folds"} and len(saved["bag_auc"]["folds"]) == 3
    assert saved["instance_auc"] is not None and saved["instance_auc_attention"] is not None
    assert abs(saved["bag_auc"]["mean"] - np.mean(saved["bag_auc"]["folds"])) < 1e-9
    for f in ("roc.png", "curves.png", "predictions.csv", "config.json", "splits/fold_0.csv",
              "fold_2/model.safetensors", "fold_2/result.json"):
        assert (run / f).stat().st_size > 0, f
    preds = (run / "predictions.csv").read_text().splitlines()
    assert len(preds) == 1 + len(c.bags)            # every slide tested exactly once
    cfg_json = json.loads((run / "config.json").read_text())
    assert cfg_json["w2s"] and cfg_json["class_names"] == ["normal", "tumor"] and cfg_json["in_dim"] == DIM

    # Resume: every fold is on disk, nothing is trained again, the same metrics come back.
    import mil.train as train_mod

    monkeypatch.setattr(train_mod, "train_fold", lambda *a, **k: pytest.fail("fold trained again"))
    assert train_cohort(c, cfg, run, instance_labels="tumor", progress=False)["bag_auc"] == m["bag_auc"]
    # Other settings into the same folder: refused.
    with pytest.raises(ValueError, match="other settings"):
        train_cohort(c, TrainConfig(model="dsmil", folds=3), run, progress=False)


def test_same_seed_same_result():
    c = cohort()
    split = Split(0, train=list(range(16)), val=list(range(16, 18)), test=list(range(18, 24)))
    cfg = TrainConfig(model="abmil", model_kwargs=SMALL["abmil"], epochs=4, batch_size=4, min_epochs=1,
                      device="cpu", w2s=W2SConfig(warmup=1, ramp=1))
    a = train_fold(c, split, cfg, progress=False)[1]
    b = train_fold(c, split, cfg, progress=False)[1]
    assert a.test_probs == b.test_probs and json.dumps(a.history) == json.dumps(b.history)   # NaN-safe


def test_w2s_needs_a_binary_task(tmp_path):
    bags = separable_bags(12)
    for i, b in enumerate(bags):
        b.label = i % 3
    c = Cohort(bags=bags, class_names=["a", "b", "c"], positive_class=None, encoder="toy", source="test")
    with pytest.raises(ValueError, match="binary"):
        train_cohort(c, TrainConfig(w2s=W2SConfig(enabled=True)), tmp_path / "r", progress=False)


def test_multiclass_trains_without_instance_metrics(tmp_path):
    bags = separable_bags(18)
    for i, b in enumerate(bags):
        b.label = i % 3
        b.patient_id = b.slide_id
    c = Cohort(bags=bags, class_names=["a", "b", "c"], positive_class=None, encoder="toy", source="test")
    m = train_cohort(c, TrainConfig(model_kwargs=SMALL["abmil"], epochs=2, folds=2, min_epochs=1, device="cpu"),
                     tmp_path / "r", progress=False)
    assert m["instance_auc"] is None and m["bag_auc"] is not None and not (tmp_path / "r" / "roc.png").exists()
