"""Training, cross-validation, run folders and the `mil` command line, on small separable cohorts."""
import json

import numpy as np
import pytest
import torch

from conftest import make_store
from mil.cohort import Bag, Cohort, load_cohort
from mil.config import TrainConfig, W2SConfig
from mil.splits import Split
from mil.train import train_cohort, train_fold
from wsi.errors import RunError

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
    # Other settings into the same folder: refused, naming what differs.
    with pytest.raises(RunError, match=r"other settings \(model, model_kwargs, w2s.enabled, .*, batch_size, .*epochs, "
                                       r".*instance_labels differ\); choose a new --out"):
        train_cohort(c, TrainConfig(model="dsmil", folds=3), run, progress=False)
    # Other data (one slide's features, or one label) into the same folder: refused too.
    c.bags[3].features = c.bags[3].features + 0.5
    with pytest.raises(RunError, match="other data .*features, coords or labels of some slides"):
        train_cohort(c, cfg, run, instance_labels="tumor", progress=False)


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
    with pytest.raises(RunError, match="binary"):
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


# ---- settings no run can use, and folds that cannot pick a best epoch --------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"epochs": 0}, "--epochs 0: must be at least 1"),
    ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
    ({"lr": 0.0}, "--lr 0.0: must be a positive number"),
    ({"val_fraction": 1.0}, r"--val-fraction 1.0: must be in \[0, 1\)"),
    ({"max_instances": 0}, "--max-instances 0"),
    ({"w2s": {"alpha_max": 2.0}}, r"--w2s-alpha 2.0: must be a weight in \[0, 1\]"),
])
def test_unusable_settings_are_refused_up_front(kw, match):
    if "w2s" in kw:
        with pytest.raises(RunError, match=match):
            W2SConfig(**kw["w2s"])
        return
    with pytest.raises(RunError, match=match):
        TrainConfig(**kw)


def test_epochs_mutated_to_zero_is_refused_before_training():
    cfg = TrainConfig(device="cpu")
    cfg.epochs = 0
    split = Split(0, train=list(range(16)), val=list(range(16, 18)), test=list(range(18, 24)))
    with pytest.raises(RunError, match="--epochs 0"):
        train_fold(cohort(), split, cfg, progress=False)


def test_all_nan_validation_loss_is_one_clear_error():
    bags = separable_bags(24)
    for b in bags:
        b.features[0, 0] = np.nan                      # one broken tile per slide poisons every bag
    split = Split(3, train=list(range(16)), val=list(range(16, 18)), test=list(range(18, 24)))
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=3, min_epochs=0, patience=2, device="cpu")
    with pytest.raises(RunError) as e:
        train_fold(cohort(bags), split, cfg, progress=False)
    msg = str(e.value)
    assert msg.startswith("fold 3: no epoch gave a finite validation loss (last: nan, nan)") and "\n" not in msg
    assert "lower the learning rate (--lr, now 0.0002)" in msg
    assert "re-embed the 18 of the fold's 18 training and validation slides whose features hold NaN" in msg


def test_diverging_training_is_one_clear_error():
    split = Split(0, train=list(range(16)), val=list(range(16, 18)), test=list(range(18, 24)))
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=3, min_epochs=0, device="cpu", lr=1e30)
    with pytest.raises(RunError, match="fold 0: no epoch gave a finite validation loss.*--lr, now 1e.30.*"
                                       "or check the features"):
        train_fold(cohort(), split, cfg, progress=False)


def test_deterministic_algorithms_only_inside_training():
    torch.use_deterministic_algorithms(False)
    seen = []
    import mil.train as train_mod

    real = train_mod.train_epoch

    def spy(*a, **k):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real(*a, **k)

    split = Split(0, train=list(range(16)), val=list(range(16, 18)), test=list(range(18, 24)))
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=2, min_epochs=0, device="cpu")
    try:
        train_mod.train_epoch = spy
        train_fold(cohort(), split, cfg, progress=False)
    finally:
        train_mod.train_epoch = real
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()


# ---- resume on other data ------------------------------------------------------------------------------
@pytest.fixture()
def labelled_store(tmp_path):
    bags = separable_bags(16, seed=5)
    store = make_store(tmp_path / "s.zarr", {b.slide_id: {"coords": b.coords} for b in bags},
                       features={"toy": {b.slide_id: b.features for b in bags}})
    csv = tmp_path / "labels.csv"
    csv.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{'tumor' if b.label else 'normal'}\n" for b in bags))
    return store, csv, bags


def test_resume_refuses_a_changed_labels_csv_or_feature_source(labelled_store, tmp_path, monkeypatch):
    store, csv, bags = labelled_store
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=2, min_epochs=0, folds=2, device="cpu")
    load = lambda path=store.path: load_cohort(csv, store=path, encoder="toy", progress=False)  # noqa: E731
    run = tmp_path / "run"
    first = train_cohort(load(), cfg, run, progress=False)
    data = json.loads((run / "config.json").read_text())["data"]
    assert data["labels_csv"] == str(csv.resolve()) and len(data["labels_sha256"]) == 64
    assert data["features"]["kind"] == "store" and data["features"]["encoder"] == "toy"
    assert data["features"]["path"] == str(store.path.resolve()) and data["features"]["slides"] == 16

    import mil.train as train_mod

    monkeypatch.setattr(train_mod, "train_fold", lambda *a, **k: pytest.fail("fold trained again"))
    assert train_cohort(load(), cfg, run, progress=False)["bag_auc"] == first["bag_auc"]   # same data: resumed

    text = csv.read_text()
    csv.write_text(text.replace("s00,normal", "s00,tumor"))                # one label changed
    with pytest.raises(RunError, match=f"{run}: holds a run trained on other data \\(labels CSV {csv} changed"):
        train_cohort(load(), cfg, run, progress=False)
    csv.write_text(text + "not_embedded,tumor\n")                          # a row without features: still the CSV
    with pytest.raises(RunError, match="labels CSV .* changed since the run began"):
        train_cohort(load(), cfg, run, progress=False)
    csv.write_text(text)

    store["s03"].write_features("toy", bags[3].features * 2, {})           # one slide re-embedded
    with pytest.raises(RunError, match="some slides in store .*s.zarr \\(encoder 'toy'\\) changed"):
        train_cohort(load(), cfg, run, progress=False)
    store["s03"].write_features("toy", bags[3].features, {})
    assert train_cohort(load(), cfg, run, progress=False)["bag_auc"] == first["bag_auc"]

    other = make_store(tmp_path / "other.zarr", {b.slide_id: {"coords": b.coords} for b in bags},
                       features={"toy": {b.slide_id: b.features for b in bags}})
    with pytest.raises(RunError, match="features were from store .*s.zarr .*now from store .*other.zarr"):
        train_cohort(load(other.path), cfg, run, progress=False)


def test_a_run_that_failed_before_its_first_fold_takes_the_corrected_retry(tmp_path):
    """`--device cuda` on a machine without one fails after the folder is made; the corrected command
    (another device, and another setting too) then starts the folder afresh."""
    c = cohort(separable_bags(12))
    run = tmp_path / "run"
    kw = dict(model="abmil", model_kwargs=SMALL["abmil"], epochs=2, batch_size=4, min_epochs=1, folds=2)
    missing = f"cuda:{torch.cuda.device_count()}"      # a GPU this machine does not have
    with pytest.raises(Exception):
        train_cohort(c, TrainConfig(**kw, device=missing), run, progress=False)
    assert (run / "config.json").exists()              # the failed start left its folder behind
    m = train_cohort(c, TrainConfig(**kw, device="cpu", lr=1e-3), run, progress=False)
    assert len(m["bag_auc"]["folds"]) == 2
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["device"] == "cpu" and saved["train"]["lr"] == 1e-3


def test_where_a_run_computes_is_not_its_identity(tmp_path):
    """A started run resumes on another device or precision; its settings proper still may not change."""
    c = cohort(separable_bags(12))
    run = tmp_path / "run"
    kw = dict(model="abmil", model_kwargs=SMALL["abmil"], epochs=2, batch_size=4, min_epochs=1, folds=2)
    first = train_cohort(c, TrainConfig(**kw, device="cpu", precision="fp32"), run, progress=False)
    (run / "fold_1" / "result.json").unlink()          # as if killed during the last fold
    again = train_cohort(c, TrainConfig(**kw, device="auto", precision="auto"), run, progress=False)
    assert again["bag_auc"]["folds"][0] == first["bag_auc"]["folds"][0]   # fold 0 kept, not retrained
    with pytest.raises(RunError, match=r"other settings \(lr differ\)"):
        train_cohort(c, TrainConfig(**kw, lr=1e-2), run, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"architectures": ["BertModel"]}')
    with pytest.raises(RunError, match="not the config of a mil run"):
        train_cohort(c, TrainConfig(**kw), tmp_path / "other", progress=False)
