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
    """A store with 32 slides of toy features (their slide files do not exist), tile labels, a labels CSV."""
    root = tmp_path_factory.mktemp("milcli")
    store = TileStore.create(root / "toy.zarr")
    bags = separable_bags(32, seed=1)
    for b in bags:
        coords = np.arange(len(b.features))[:, None] * np.array([[512, 0]])
        view = store.add_slide(b.slide_id, coords, target_mpp=0.5, slide_mpp=0.25, patch_size=256,
                               tile_size_level0=512, width=512 * len(b.features), height=512,
                               source="/nonexistent.svs")
        view.write_features("toy", b.features, {})
        view.write_labels("tumor", b.instance_labels, {})
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
    store = TileStore.open(root / "toy.zarr", readonly=True)
    arrays, attrs = store[bags[0].slide_id].predictions("run")
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


def test_clear_errors(tmp_path, capsys):
    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mil: error: ") and "\n" not in err and "Traceback" not in err, err
        return err

    msg = error(["train", "--labels", "x.csv", "--encoder", "e", "--out", str(tmp_path / "r")])
    assert msg == "mil: error: give exactly one of --store STORE or --h5-dir DIR"
    msg = error(["train", "--store", str(tmp_path / "missing.zarr"), "--labels", str(tmp_path / "x.csv"),
                 "--encoder", "e", "--out", str(tmp_path / "r")])
    assert "x.csv: no such labels CSV" in msg
    (tmp_path / "x.csv").write_text("slide_id,label\na,x\n")
    msg = error(["train", "--store", str(tmp_path / "missing.zarr"), "--labels", str(tmp_path / "x.csv"),
                 "--encoder", "e", "--out", str(tmp_path / "r")])
    assert f"{tmp_path / 'missing.zarr'}: no tile store here" in msg and not (tmp_path / "missing.zarr").exists()
    assert "no tile store here" in error(["predict", "--store", str(tmp_path / "s.zarr"),
                                          "--run", str(tmp_path / "norun")])
    assert not (tmp_path / "s.zarr").exists()
    assert "no tile store here" in error(["heatmap", "--store", str(tmp_path / "s.zarr"), "--run", "r", "--slide", "a",
                                          "--out", str(tmp_path / "maps")])


def test_epochs_zero_is_refused_before_loading_anything(tmp_path, capsys):
    # refused from the options alone: the labels CSV and the store named here do not exist
    assert main(["train", "--store", str(tmp_path / "s.zarr"), "--labels", str(tmp_path / "l.csv"), "--encoder", "e",
                 "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "mil: error: --epochs 0: must be at least 1"
    assert main(["train", "--store", "s", "--labels", "l", "--encoder", "e", "--w2s-alpha", "3",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--w2s-alpha 3.0: must be a weight in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:                            # argparse: usage error, exit 2
        main(["train", "--store", "s", "--labels", "l", "--encoder", "e", "--model-kwargs", "{bad", "--out", "r"])
    assert e.value.code == 2 and "--model-kwargs: not JSON" in capsys.readouterr().err


def test_heatmap_of_run_dot_from_inside_the_run_folder(toy_store, tmp_path, monkeypatch, capsys):
    """`mil heatmap --run .` names the predictions after the folder `.` is, as `mil predict --run .` does."""
    root, bags = toy_store
    run = tmp_path / "dotrun"
    assert main(["-q", "train", "--store", str(root / "toy.zarr"), "--labels", str(root / "labels.csv"),
                 "--encoder", "toy", "--model-kwargs", '{"hidden": 16, "attn_hidden": 8}', "--folds", "2",
                 "--epochs", "1", "--min-epochs", "0", "--out", str(run)]) == 0
    monkeypatch.chdir(run)
    assert main(["-q", "predict", "--store", str(root / "toy.zarr"), "--run", ".", "--slides", bags[1].slide_id]) == 0
    assert "dotrun" in TileStore.open(root / "toy.zarr", readonly=True)[bags[1].slide_id].prediction_names()
    capsys.readouterr()
    assert main(["-q", "heatmap", "--store", str(root / "toy.zarr"), "--run", ".", "--slide", bags[1].slide_id,
                 "--out", "maps"]) == 0
    assert sorted(p.name for p in (run / "maps").iterdir()) == [
        f"{bags[1].slide_id}_dotrun.geojson", f"{bags[1].slide_id}_dotrun_attention.png",
        f"{bags[1].slide_id}_dotrun_instance.png"]


def test_train_options_are_the_config_dataclasses():
    """Every TrainConfig / W2SConfig field is an option of `mil train` with the dataclass's default."""
    import dataclasses

    from mil.cli import build_parser
    from mil.config import TrainConfig, W2SConfig

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    want = {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig) if f.name != "w2s"}
    want |= {f"w2s_{f.name}": getattr(TrainConfig().w2s, f.name) for f in dataclasses.fields(W2SConfig)}
    assert set(want) <= set(by_dest), set(want) - set(by_dest)
    assert {k: by_dest[k].default for k in want} == want
    assert by_dest["w2s_alpha_max"].option_strings == ["--w2s-alpha"]
    assert by_dest["w2s_enabled"].option_strings == ["--w2s"] and by_dest["w2s_enabled"].default is False
    help_text = train.format_help()
    assert "one of abmil, clam-sb, dsmil, transmil" in " ".join(help_text.split())   # from the registry


def test_models_lists_the_registry(capsys):
    assert main(["models", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert names == {"abmil", "clam-sb", "dsmil", "transmil"}
