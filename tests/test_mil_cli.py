"""`mil train / predict / heatmap / models` end to end on a small store and on a CLAM h5 folder."""
import json

import numpy as np
import pytest
import torch

from mil.cli import main
from wsi.store import TileStore

from test_mil_train import separable_bags


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    """A store with 20 slides of toy features (no slide files), tile labels, a labels CSV."""
    root = tmp_path_factory.mktemp("milcli")
    store = TileStore(root / "toy.zarr")
    bags = separable_bags(32, seed=1)
    for b in bags:
        coords = (np.arange(len(b.features))[:, None] * np.array([[512, 0]])).astype(np.int32)
        store.begin_slide(b.slide_id, {"mpp": 0.5, "patch_size": 256, "patch_size_level0": 512, "slide_mpp": 0.25,
                                       "width": 512 * len(b.features), "height": 512, "source": "/nonexistent.svs"})
        store.write_slide_arrays(b.slide_id, coords, np.zeros((4, 4), np.uint8), {"downsample": [128, 128]}, None)
        store.write_features(b.slide_id, "toy", b.features, {})
        store.write_labels(b.slide_id, "tumor", b.instance_labels, {})
        store.mark_complete(b.slide_id)
    labels = root / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{'tumor' if b.label else 'normal'}\n" for b in bags)
                      + "ghost_slide,tumor\n")
    return root, bags


def test_train_predict_heatmap_from_a_store(toy_store, capsys, caplog):
    root, bags = toy_store
    run = root / "run"
    rc = main(["-q", "train", "--store", str(root / "toy.zarr"), "--labels", str(root / "labels.csv"),
               "--encoder", "toy", "--model", "abmil", "--model-kwargs", '{"hidden": 32, "attn_hidden": 16}',
               "--w2s", "--w2s-warmup", "2", "--w2s-ramp", "2", "--folds", "2", "--epochs", "25", "--batch-size", "4",
               "--instance-labels", "tumor", "--lr", "1e-3", "--out", str(run)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "abmil" in out and "yes" in out and "±" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["positive_class"] == "tumor" and m["w2s"] and len(m["bag_auc"]["folds"]) == 2
    assert m["bag_auc"]["mean"] > 0.7                     # learning itself is checked in test_mil_train.py
    assert all(0 <= v <= 1 for v in m["instance_auc"]["folds"] + m["instance_auc_attention"]["folds"])
    assert "ghost_slide" in caplog.text                      # listed in one warning, not a crash

    assert main(["-q", "predict", "--store", str(root / "toy.zarr"), "--run", str(run)]) == 0
    store = TileStore(root / "toy.zarr", mode="r")
    arrays, attrs = store.predictions(bags[0].slide_id, "run")
    assert arrays["instance_score"].shape == (len(bags[0].features),)
    assert abs(float(np.mean(arrays["attention"])) - 1) < 1e-3 or arrays["attention"].min() >= 0
    assert attrs["positive_class"] == "tumor" and abs(sum(attrs["bag_probs"]) - 1) < 1e-5

    pos = next(b for b in bags if b.label == 1)
    assert main(["-q", "heatmap", "--store", str(root / "toy.zarr"), "--run", str(run), "--slide", pos.slide_id,
                 "--out", str(root / "maps")]) == 0
    files = sorted(p.name for p in (root / "maps").iterdir())
    assert any(f.endswith(".png") for f in files) and any(f.endswith(".geojson") for f in files)
    gj = json.loads(next((root / "maps").glob("*.geojson")).read_text())
    assert len(gj["features"]) == len(pos.features)


def test_train_from_a_clam_h5_folder(tmp_path, capsys):
    import h5py

    bags = separable_bags(16, seed=2)
    (tmp_path / "h5_files").mkdir()
    for b in bags:
        with h5py.File(tmp_path / "h5_files" / f"{b.slide_id}.h5", "w") as f:
            f["features"] = b.features
            f["coords"] = b.coords
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + "".join(f"{b.slide_id},{b.label}\n" for b in bags))
    rc = main(["-q", "train", "--h5-dir", str(tmp_path), "--labels", str(tmp_path / "labels.csv"), "--encoder", "uni",
               "--model", "dsmil", "--folds", "2", "--epochs", "4", "--out", str(tmp_path / "run")])
    assert rc == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["model"] == "dsmil" and m["positive_class"] == "1" and m["instance_auc"] is None


def test_clear_errors(tmp_path, caplog):
    assert main(["train", "--labels", "x.csv", "--encoder", "e", "--out", str(tmp_path / "r")]) == 2
    assert "exactly one of --store" in caplog.text
    assert main(["train", "--store", str(tmp_path / "missing.zarr"), "--labels", str(tmp_path / "x.csv"),
                 "--encoder", "e", "--out", str(tmp_path / "r")]) == 2
    assert main(["predict", "--store", str(tmp_path / "s.zarr"), "--run", str(tmp_path / "norun")]) == 2


def test_models_lists_the_registry(capsys):
    assert main(["models", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert names == {"abmil", "clam-sb", "dsmil", "transmil"}
