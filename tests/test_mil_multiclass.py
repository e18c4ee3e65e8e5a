"""More than two classes: subtyping (a, b, c) and a negative class with subtypes (normal, luad, lusc):
training with every model, metrics.json's multi-class keys, confusion.png, per-class predictions and
heatmaps, and --w2s (refused on pure subtyping, trained with a negative class)."""
import json

import numpy as np
import pytest
import torch

from conftest import make_store
from mil.cli import main as mil_main
from mil.cohort import Bag, Cohort
from mil.config import TrainConfig, W2SConfig
from mil.heatmap import write_heatmap
from mil.labels import negative_class
from mil.predict import predict_store
from mil.splits import Split
from mil.train import train_cohort, train_fold
from mil.w2s import class_loss, positive_logit
from test_mil_predict import add_slide, tissue_png
from wsi.errors import LabelsError, RunError
from wsi.store import TileStore

DIM = 16
SMALL = {"abmil": {"hidden": 32, "attn_hidden": 16}, "clam-sb": {"hidden": 32, "attn_hidden": 16, "k_sample": 4},
         "dsmil": {}, "transmil": {"hidden": 32, "heads": 2, "dim_head": 16, "num_landmarks": 8}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def three_class_bags(n_bags: int = 36, seed: int = 0, negative: bool = True) -> list[Bag]:
    """Bags of 20-50 Gaussian instances, label i % 3. Each class but a negative one (class 0 when
    `negative`) holds ~25% witnesses shifted on its own 4 dims; with `negative=False` class 0 has
    witnesses too (pure subtyping)."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        n = int(rng.integers(20, 51))
        label = i % 3
        x = rng.standard_normal((n, DIM)).astype(np.float32)
        inst = np.zeros(n, np.float32)
        if label or not negative:
            idx = rng.choice(n, max(3, n // 4), replace=False)
            x[idx, 4 * label:4 * label + 4] += 2.5
            inst[idx] = 1.0
        bags.append(Bag(f"s{i:02d}", f"p{i:02d}", label, x, rng.integers(0, 10_000, (n, 2)), inst))
    return bags


def cohort(names=("normal", "luad", "lusc"), **kw) -> Cohort:
    return Cohort(bags=three_class_bags(negative=names[0] == "normal", **kw), class_names=list(names),
                  positive_class=None, encoder="toy", source="test")


def macro_auc(y, probs) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, probs, multi_class="ovr", labels=[0, 1, 2])


@pytest.mark.parametrize("model", ["abmil", "clam-sb", "dsmil", "transmil"])
def test_each_model_learns_three_classes(model):
    c = cohort(("a", "b", "c"), n_bags=42)
    split = Split(0, train=list(range(24)), val=list(range(24, 30)), test=list(range(30, 42)))
    cfg = TrainConfig(model=model, model_kwargs=SMALL[model], epochs=15, batch_size=8, lr=1e-3, min_epochs=3,
                      device="cpu")
    _, res = train_fold(c, split, cfg, progress=False)
    probs = np.array(res.test_probs)
    assert probs.shape == (12, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert res.metrics["auc"] >= 0.85, res.metrics                       # chance is 0.5
    assert abs(res.metrics["auc"] - macro_auc(res.test_labels, probs)) < 1e-9
    assert len(res.metrics["auc_per_class"]) == 3 and np.sum(res.metrics["confusion"]) == 12
    assert "class" in {k.removeprefix("loss_") for k in res.history[0]}  # the student learns the classes


@pytest.fixture(scope="module")
def subtyping_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    c = cohort(("a", "b", "c"))
    cfg = TrainConfig(model="abmil", model_kwargs=SMALL["abmil"], epochs=8, batch_size=8, lr=1e-3, folds=3,
                      min_epochs=2, device="cpu")
    return c, train_cohort(c, cfg, root / "run", progress=False), root / "run"


def test_metrics_json_has_the_multiclass_keys_and_a_confusion_png(subtyping_run):
    c, m, run = subtyping_run
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert saved["class_names"] == ["a", "b", "c"] and saved["bag_auc_average"] == "macro one-vs-rest"
    assert saved["bag_auc"]["mean"] > 0.8 and saved["bag_balanced_accuracy"]["mean"] > 0.5
    assert set(saved["bag_auc_per_class"]) == {"a", "b", "c"}
    assert all(len(v["folds"]) == 3 for v in saved["bag_auc_per_class"].values())
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == len(c.bags)                # every slide tested once
    assert np.array_equal(cm.sum(1), np.bincount(c.labels(), minlength=3))   # rows: true class
    assert (run / "confusion.png").stat().st_size > 0 and not (run / "roc.png").exists()
    header = (run / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith("prob_a,prob_b,prob_c")


def test_binary_metrics_keys_are_unchanged(tmp_path):
    from test_mil_train import cohort as binary_cohort

    m = train_cohort(binary_cohort(), TrainConfig(model_kwargs=SMALL["abmil"], epochs=2, folds=2, min_epochs=1,
                                                  device="cpu"), tmp_path / "r", progress=False)
    assert set(m) == {"model", "w2s", "positive_class", "class_names", "encoder", "folds", "run_id", "bag_auc",
                      "bag_accuracy", "bag_balanced_accuracy", "bag_f1", "instance_auc", "instance_ap",
                      "instance_auc_attention", "instance_ap_attention", "instance_auc_baseline",
                      "instance_ap_baseline", "baseline_seconds", "best_epochs", "instance_labels"}
    fold = json.loads((tmp_path / "r" / "fold_0" / "result.json").read_text())
    assert set(fold["metrics"]) == {"auc", "accuracy", "balanced_accuracy", "f1"}
    assert (tmp_path / "r" / "roc.png").exists() and not (tmp_path / "r" / "confusion.png").exists()


def test_predict_and_heatmap_write_one_score_per_class(subtyping_run, tmp_path):
    _, _, run = subtyping_run
    store = TileStore.create(tmp_path / "s.zarr")
    png = tissue_png(tmp_path / "slide.png")
    coords = add_slide(store, "x1", png, seed=5)
    rows = predict_store(store, run, name="mc", progress=False)
    assert rows[0]["status"] == "predicted" and rows[0]["predicted_class"] in ("a", "b", "c")
    arrays, attrs = store["x1"].predictions("mc")
    assert attrs["class_names"] == ["a", "b", "c"] and len(attrs["bag_probs"]) == 3
    assert arrays["class_scores"].shape == (len(coords), 3)
    np.testing.assert_allclose(arrays["class_scores"].sum(1), 1, atol=1e-5)
    pred = attrs["class_names"].index(attrs["predicted_class"])
    np.testing.assert_allclose(arrays["instance_score"], arrays["class_scores"][:, pred], atol=1e-6)
    paths = write_heatmap(store, "x1", tmp_path / "hm", run="mc")
    names = [p.name for p in paths]
    assert names == ["x1_mc_instance.png", "x1_mc_attention.png", "x1_mc_class_a.png", "x1_mc_class_b.png",
                     "x1_mc_class_c.png", "x1_mc.geojson"]
    feat = json.loads(paths[-1].read_text())["features"][0]["properties"]["measurements"]
    assert {"score_a", "score_b", "score_c", "instance_score", "attention"} == set(feat)


def test_w2s_is_refused_on_pure_subtyping_with_the_reason(tmp_path):
    with pytest.raises(RunError, match=r"^--w2s needs a negative class .*classes a, b, c are pure subtyping.*"
                                       r"--negative-class$"):
        train_cohort(cohort(("a", "b", "c")), TrainConfig(w2s=W2SConfig(enabled=True)), tmp_path / "r",
                     progress=False)
    assert not (tmp_path / "r").exists()                                 # refused before any work


def test_w2s_with_a_negative_class_trains_each_subtype(tmp_path):
    c = cohort(("normal", "luad", "lusc"))
    cfg = TrainConfig(model="abmil", model_kwargs=SMALL["abmil"], epochs=20, batch_size=8, lr=2e-3, folds=3,
                      min_epochs=2, device="cpu", w2s=W2SConfig(warmup=1, ramp=2, min_warmup_steps=0))
    m = train_cohort(c, cfg, tmp_path / "r", progress=False)
    assert m["w2s"] is True and m["bag_auc"]["mean"] > 0.9 and np.sum(m["confusion_matrix"]) == len(c.bags)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["negative_class"] == "normal"
    fold = json.loads((tmp_path / "r" / "fold_0" / "result.json").read_text())
    losses = set().union(*fold["history"])
    assert {"loss_instance", "loss_class", "loss_distill"} <= losses
    assert fold["w2s"]["evidence"]["computed"]                           # normal bags are the sure negatives


def test_cli_classes_order_negative_class_and_the_one_line_refusal(tmp_path, capsys):
    bags = three_class_bags(15, seed=3)
    store = make_store(tmp_path / "s.zarr", {b.slide_id: {"coords": b.coords} for b in bags},
                       features={"toy": {b.slide_id: b.features for b in bags}})
    csv = tmp_path / "labels.csv"
    names = ["ctrl", "x", "y"]
    csv.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{names[b.label]}\n" for b in bags))
    base = ["train", "--store", str(store.path), "--labels", str(csv), "--encoder", "toy", "--epochs", "2",
            "--folds", "2", "--min-epochs", "0", "--device", "cpu", "--model-kwargs", json.dumps(SMALL["abmil"]), "-q"]
    assert mil_main(base + ["--classes", "y,x,ctrl", "--w2s", "--out", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pure subtyping" in err and "--negative-class" in err
    assert mil_main(base + ["--classes", "y,x,ctrl", "--negative-class", "ctrl", "--w2s", "--w2s-warmup", "0",
                            "--w2s-min-warmup-steps", "0", "--out", str(tmp_path / "r2")]) == 0
    cfg = json.loads((tmp_path / "r2" / "config.json").read_text())
    assert cfg["class_names"] == ["y", "x", "ctrl"] and cfg["negative_class"] == "ctrl"
    preds = (tmp_path / "r2" / "predictions.csv").read_text().splitlines()
    assert preds[0].endswith("prob_y,prob_x,prob_ctrl")
    by_id = {b.slide_id: names[b.label] for b in bags}
    assert all(row.split(",")[3] == by_id[row.split(",")[0]] for row in preds[1:])   # labels in --classes order


def test_negative_class_rule():
    assert negative_class(["normal", "luad", "lusc"]) == "normal"
    assert negative_class(["Benign", "ccRCC", "pRCC"]) == "Benign"
    assert negative_class(["a", "b", "c"]) is None                        # pure subtyping
    assert negative_class(["ctrl", "a", "b"], "ctrl") == "ctrl"           # --negative-class
    assert negative_class(["x", "y"]) == "x"                              # binary: index 0
    with pytest.raises(LabelsError, match="'nope' is not a class .*--negative-class"):
        negative_class(["a", "b", "c"], "nope")
    with pytest.raises(LabelsError, match="give --positive instead"):
        negative_class(["x", "y"], "y")


def test_tumour_logit_and_class_loss():
    z = torch.randn(2, 5, 2)
    assert torch.equal(positive_logit(z), z[..., 1] - z[..., 0])          # binary: as before
    z3 = torch.randn(2, 5, 3)
    p = z3.softmax(-1)
    torch.testing.assert_close(torch.sigmoid(positive_logit(z3, 0)), 1 - p[..., 0])   # P(not negative)
    # A bag of class 2 teaches class 2 to its attended instance only; the negative bag teaches nothing here.
    logits = torch.zeros(2, 4, 3, requires_grad=True)
    att = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    mask = torch.ones(2, 4, dtype=torch.bool)
    class_loss(logits, att, mask, torch.tensor([2, 0]), negative=0).backward()
    g = logits.grad
    assert g[0, 0, 2] < 0 and g[0, 0, 1] > 0 and g[0, 0, 0] == 0          # pushed to class 2, vs class 1 only
    assert torch.all(g[0, 1:] == 0) and torch.all(g[1] == 0)             # min-max attention 0; negative bag
