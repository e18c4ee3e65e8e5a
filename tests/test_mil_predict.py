"""Run folders (safetensors checkpoints), `predict_store` into the tile store, and heatmaps + GeoJSON."""
import json
import logging

import numpy as np
import pytest
import torch

from conftest import write_png
from mil.checkpoint import RunError, load_run, save_config, save_fold_model
from mil.heatmap import BAR_PX, TITLE_PX, write_heatmap
from mil.models import create_model
from mil.predict import predict_bag, predict_store
from wsi.store import SlideMeta, StoreError, TileStore, file_fingerprint

DIM, W, H, SLIDE_MPP, PS, PS0 = 16, 768, 512, 0.5, 64, 128
SMALL = {"hidden": 32, "attn_hidden": 16}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tissue_png(path):
    """A white 768x512 'slide' with a pink elliptic tissue blob and some texture (no resolution metadata)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    inside = ((xx - W / 2) / (W * 0.42)) ** 2 + ((yy - H / 2) / (H * 0.4)) ** 2 < 1
    img = np.full((H, W, 3), 245, np.uint8)
    pink = np.array([200, 110, 170]) + rng.integers(-30, 30, (H, W, 3))
    img[inside] = np.clip(pink[inside], 0, 255).astype(np.uint8)
    return write_png(path, img)


def add_slide(store, sid, source, *, n=None, dim=DIM, features=True, complete=True, seed=0):
    """A slide as `wsi tile` records it (no stored tiles: pixels come from `source`), a tile grid and toy
    features; `complete=False` leaves it "writing"."""
    grid = np.array([(x, y) for y in range(0, H - PS0 + 1, PS0) for x in range(0, W - PS0 + 1, PS0)], np.int32)
    coords = grid[:n] if n else grid
    meta = dict(source=str(source), fingerprint=file_fingerprint(source) if source.exists() else "gone",
                slide_mpp=SLIDE_MPP, target_mpp=1.0, patch_size=PS, tile_size_level0=PS0, width=W, height=H,
                min_tissue=0.25)
    if complete:
        view = store.add_slide(sid, coords, **meta)
    else:
        view = store.begin_slide(SlideMeta(sid, **meta))
        view.write_arrays(coords)
    if features:
        rng = np.random.default_rng(seed)
        view.write_features("toy", rng.standard_normal((len(coords), dim)).astype(np.float32), {"dim": dim})
    return coords


def config(**over):
    c = {"model": "abmil", "model_kwargs": SMALL, "in_dim": DIM, "n_classes": 2, "class_names": ["normal", "tumor"],
         "positive_class": "tumor", "encoder": "toy", "w2s": False, "w2s_params": {}, "folds": 2,
         "instance_labels": None, "source": "test", "run_id": "run1-test", "created": "2024-01-01T00:00:00+00:00",
         "pathmil_version": "test", "seed": 0}
    return {**c, **over}


def make_run(run_dir, cfg=None, folds=(0, 1)):
    cfg = cfg or config()
    save_config(run_dir, cfg)
    models = []
    for k in folds:
        torch.manual_seed(100 + k)
        m = create_model(cfg["model"], cfg["in_dim"], cfg["n_classes"], **cfg["model_kwargs"])
        save_fold_model(run_dir, k, m)
        models.append(m.eval())
    return models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store (two scored slides, one whose source file is gone, one without features, one unfinished),
    a 2-fold run, and predictions of that run."""
    root = tmp_path_factory.mktemp("milpred")
    png = tissue_png(root / "slide.png")
    store = TileStore.create(root / "s.zarr")
    coords = {"s1": add_slide(store, "s1", png, seed=1), "s2": add_slide(store, "s2", png, n=10, seed=2),
              "gone": add_slide(store, "gone", root / "moved_away.png", n=7, seed=3)}
    add_slide(store, "nofeat", png, features=False)
    add_slide(store, "unfinished", png, complete=False, seed=4)
    run = root / "run1"
    models = make_run(run)
    rows = predict_store(store, run, progress=False)
    return {"root": root, "store": store, "run": run, "models": models, "rows": rows, "coords": coords}


def test_run_folder_round_trip(tmp_path):
    models = make_run(tmp_path / "run", config(w2s=True, w2s_params={"reject_below": 0.2, "min_keep": 3}))
    text = (tmp_path / "run" / "config.json").read_text()
    assert json.loads(text)["model"] == "abmil" and '\n  "model"' in text          # indent 2
    assert not list(tmp_path.rglob("*.tmp"))                                     # temp files renamed away
    cfg, loaded = load_run(tmp_path / "run")
    assert cfg["in_dim"] == DIM and len(loaded) == 2 and not any(m.training for m in loaded)
    assert loaded[0].reject_below == 0.2 and loaded[0].min_keep == 3             # w2s filtering kept
    x = torch.randn(30, DIM)
    for m in models:
        m.reject_below, m.min_keep = 0.2, 3
    for a, b in zip(models, loaded):
        oa, ob = a.predict_bag(x), b.predict_bag(x)
        for f in ("bag_logits", "attention", "instance_logits"):
            assert torch.equal(getattr(oa, f), getattr(ob, f)), f
    _, one = load_run(tmp_path / "run", folds=[1])
    assert len(one) == 1 and torch.equal(one[0].predict_bag(x).bag_logits, models[1].predict_bag(x).bag_logits)


def test_load_run_never_unpickles(tmp_path, monkeypatch):
    make_run(tmp_path / "run")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert len(load_run(tmp_path / "run")[1]) == 2


def test_load_run_errors_say_what_to_do(tmp_path):
    with pytest.raises(RunError, match=r"not a mil run \(no such folder\).*mil train .* --out"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a mil run \(no config.json\)"):
        load_run(tmp_path / "empty")
    run = tmp_path / "run"
    make_run(run)
    with pytest.raises(RunError, match=r"fold_5.*re-run the same `mil train`"):
        load_run(run, folds=[0, 5])
    save_config(tmp_path / "noweights", config())
    with pytest.raises(RunError, match="no weights"):
        load_run(tmp_path / "noweights")
    save_config(run, config(model="no-such-model"))
    with pytest.raises(RunError, match="unknown MIL model 'no-such-model'.*abmil"):
        load_run(run)
    save_config(run, config(in_dim=DIM + 1))
    with pytest.raises(RunError, match="do not fit the model"):
        load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="not valid JSON"):
        load_run(run)


def test_predict_store_rows_and_arrays(setup):
    rows = {r["slide_id"]: r for r in setup["rows"]}
    assert set(rows) == {"s1", "s2", "gone", "nofeat"}                            # unfinished is not listed
    assert rows["nofeat"]["status"] == "skipped" and "no complete features for 'toy'" in rows["nofeat"]["error"]
    store = setup["store"]
    for sid in ("s1", "s2", "gone"):
        r = rows[sid]
        n = len(setup["coords"][sid])
        assert r["status"] == "predicted" and r["n_tiles"] == n and r["error"] is None
        arrays, attrs = store[sid].predictions("run1")
        assert set(arrays) == {"instance_score", "attention"}
        assert all(a.shape == (n,) and a.dtype == np.float32 for a in arrays.values())
        assert abs(float(arrays["attention"].mean()) - 1) < 1e-5 and arrays["attention"].min() >= 0
        assert 0 <= arrays["instance_score"].min() and arrays["instance_score"].max() <= 1
        assert abs(sum(attrs["bag_probs"]) - 1) < 1e-5 and attrs["complete"] is True
        assert attrs["predicted_class"] == ["normal", "tumor"][int(np.argmax(attrs["bag_probs"]))]
        assert {k: attrs[k] for k in ("run_id", "model", "encoder", "positive_class", "folds", "w2s")} == \
            {"run_id": "run1-test", "model": "abmil", "encoder": "toy", "positive_class": "tumor", "folds": 2,
             "w2s": False}
        assert attrs["class_names"] == ["normal", "tumor"] and attrs["created"]
        assert r["bag_prob_positive"] == pytest.approx(attrs["bag_probs"][1])
        assert r["predicted_class"] == attrs["predicted_class"]
    assert store["s1"].prediction_names() == ["run1"] and store["s1"].info()["predictions"] == ["run1"]
    assert store["nofeat"].info()["predictions"] == []


def test_predictions_match_a_direct_forward_averaged_over_folds(setup):
    store, models = setup["store"], setup["models"]
    x = torch.from_numpy(store["s1"].features("toy"))
    with torch.no_grad():
        outs = [m(x[None]) for m in models]
    bag = torch.stack([o.bag_logits[0].softmax(-1) for o in outs]).mean(0).numpy()
    inst = torch.stack([o.instance_logits[0].softmax(-1)[:, 1] for o in outs]).mean(0).numpy()
    att = torch.stack([o.attention[0] * len(x) for o in outs]).mean(0).numpy()
    arrays, attrs = store["s1"].predictions("run1")
    np.testing.assert_allclose(attrs["bag_probs"], bag, atol=1e-6)
    np.testing.assert_allclose(arrays["instance_score"], inst, atol=1e-6)
    np.testing.assert_allclose(arrays["attention"], att, atol=1e-5)


def test_multiclass_instance_score_is_the_predicted_class(tmp_path):
    run = tmp_path / "mc"
    models = make_run(run, config(n_classes=3, class_names=["a", "b", "c"], positive_class=None))
    x = torch.randn(12, DIM)
    res = predict_bag(models, x, None)
    with torch.no_grad():
        outs = [m(x[None]) for m in models]
    c = int(np.argmax(res["bag_probs"]))
    want = torch.stack([o.instance_logits[0].softmax(-1)[:, c] for o in outs]).mean(0).numpy()
    np.testing.assert_allclose(res["instance_score"], want, atol=1e-6)
    assert res["bag_probs"].shape == (3,)


def test_chosen_slides_name_and_skips(setup, tmp_path):
    rows = predict_store(setup["store"], setup["run"], slides=["s2", "ghost", "unfinished"], name="other.run",
                         progress=False)
    by = {r["slide_id"]: r for r in rows}
    assert by["s2"]["status"] == "predicted" and setup["store"]["s2"].prediction_names() == ["other.run", "run1"]
    assert by["ghost"]["status"] == "skipped" and "not in the store" in by["ghost"]["error"]
    assert by["unfinished"]["status"] == "skipped" and "'writing'" in by["unfinished"]["error"]
    with pytest.raises(RunError, match="prediction name '../x'"):
        predict_store(setup["store"], setup["run"], name="../x", progress=False)
    with pytest.raises(RunError, match="not a mil run.*mil train"):
        predict_store(setup["store"], tmp_path / "no_run", progress=False)
    with pytest.raises(StoreError, match="no tile store"):
        predict_store(tmp_path / "no_store.zarr", setup["run"], progress=False)
    assert not (tmp_path / "no_store.zarr").exists()


def test_feature_dim_mismatch_is_a_clear_per_slide_failure(setup, tmp_path):
    store = TileStore.create(tmp_path / "d.zarr")
    add_slide(store, "wide", setup["root"] / "slide.png", dim=DIM * 2)
    add_slide(store, "ok", setup["root"] / "slide.png", n=5)
    rows = {r["slide_id"]: r for r in predict_store(store, setup["run"], progress=False)}
    assert rows["wide"]["status"] == "failed"
    assert "32-d" in rows["wide"]["error"] and "16-d" in rows["wide"]["error"] and "encoder" in rows["wide"]["error"]
    assert rows["ok"]["status"] == "predicted" and store["wide"].prediction_names() == []


def test_missing_predictions_error_names_store_slide_run_and_command(setup):
    with pytest.raises(StoreError) as e:
        setup["store"]["nofeat"].predictions("run1")
    msg = str(e.value)
    assert str(setup["root"] / "s.zarr") in msg and "'nofeat'" in msg and "'run1'" in msg and "mil predict" in msg


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_heatmap_pngs_and_geojson(setup, tmp_path):
    store = setup["store"]
    paths = write_heatmap(store, "s1", tmp_path / "maps", run="run1", max_side=400)
    names = [p.name for p in paths]
    assert names == ["s1_run1_instance.png", "s1_run1_attention.png", "s1_run1.geojson"]
    inst, att = _png(paths[0]), _png(paths[1])
    # thumbnail 400 x 267 (the long side is max_side), plus room for the colour bar and the title
    assert inst.shape == att.shape and abs(inst.shape[1] - (400 + BAR_PX)) <= 1 \
        and abs(inst.shape[0] - (267 + TITLE_PX)) <= 1
    for img in (inst, att):
        assert img.std() > 20 and len(np.unique(img.reshape(-1, 3), axis=0)) > 200      # not blank
    assert not np.array_equal(inst, att)

    gj = json.loads(paths[2].read_text())
    arrays, _ = store["s1"].predictions("run1")
    coords = setup["coords"]["s1"]
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(coords)
    for i, (f, (x, y)) in enumerate(zip(gj["features"], coords.tolist())):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["geometry"]["coordinates"] == [[[x, y], [x + PS0, y], [x + PS0, y + PS0], [x, y + PS0], [x, y]]]
        p = f["properties"]
        assert p["objectType"] == "tile" and p["name"] == f"tile {i}" and "classification" not in p
        assert p["measurements"]["instance_score"] == pytest.approx(float(arrays["instance_score"][i]), abs=5e-5)
        assert p["measurements"]["attention"] == pytest.approx(float(arrays["attention"][i]), abs=5e-5)
    # kept small: int coordinates, measurements rounded to 4 decimals, no spaces
    assert all(isinstance(v, int) for f in gj["features"] for pt in f["geometry"]["coordinates"][0] for v in pt)
    assert all(round(v, 4) == v for f in gj["features"] for v in f["properties"]["measurements"].values())
    assert ", " not in paths[2].read_text()


def test_heatmap_without_the_slide_file_warns_and_draws_on_white(setup, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mil.heatmap"):
        paths = write_heatmap(setup["store"], "gone", tmp_path, run="run1", max_side=300)
    assert "moved_away.png" in caplog.text and "missing" in caplog.text
    img = _png(paths[0])
    assert abs(img.shape[1] - (300 + BAR_PX)) <= 1 and abs(img.shape[0] - (200 + TITLE_PX)) <= 1
    # 7 tiles of 128 px: the whole top row of the 768 x 512 slide and one below it, 2.56 level-0 px per px;
    # the image sits under the title band. Painted where the tiles are, white elsewhere.
    painted = lambda a: (np.abs(a.astype(int) - 255).sum(-1) > 30).mean()  # noqa: E731
    t = TITLE_PX
    assert painted(img[t + 2:t + 48, 2:298]) > 0.95 and painted(img[t + 52:t + 98, 2:48]) > 0.95
    assert painted(img[t + 110:t + 198, 5:295]) < 0.02 and painted(img[t + 52:t + 98, 55:295]) < 0.02
    assert len(json.loads(paths[2].read_text())["features"]) == 7


def test_heatmap_of_missing_predictions(setup, tmp_path):
    with pytest.raises(StoreError, match="no predictions 'nope'.*mil predict"):
        write_heatmap(setup["store"], "s1", tmp_path, run="nope")


def test_predict_into_a_missing_store_creates_nothing(setup, tmp_path):
    with pytest.raises(StoreError, match=f"{tmp_path / 'typo.zarr'}: no tile store here"):
        predict_store(tmp_path / "typo.zarr", setup["run"], progress=False)
    assert not (tmp_path / "typo.zarr").exists()


def test_heatmap_draws_stored_tiles_when_the_slide_file_is_gone(tmp_path, caplog):
    """No slide file, but tiles in the store: the background is their mosaic, not a blank canvas."""
    store = TileStore.create(tmp_path / "s.zarr")
    grid = np.array([(x, y) for y in range(0, H - PS0 + 1, PS0) for x in range(0, W - PS0 + 1, PS0)], np.int32)
    tiles = np.zeros((len(grid), PS, PS, 3), np.uint8)
    tiles[..., 2] = 200                                               # blue tiles
    view = store.add_slide("t", grid, tiles=tiles, tile_codec="lossless", source=str(tmp_path / "gone.png"),
                           slide_mpp=SLIDE_MPP, target_mpp=1.0, width=W, height=H)
    view.write_predictions("r", {"instance_score": np.zeros(len(grid)), "attention": np.ones(len(grid))},
                           {"class_names": ["a", "b"], "bag_probs": [0.5, 0.5], "positive_class": "b"})
    with caplog.at_level(logging.WARNING, logger="mil.heatmap"):
        write_heatmap(store, "t", tmp_path / "maps", run="r", max_side=300)
    assert "blank canvas" not in caplog.text
    img = _png(tmp_path / "maps" / "t_r_instance.png")[TITLE_PX + 5:TITLE_PX + 195, 5:295].astype(int)
    # blue tiles (0, 0, 200) under turbo(0) at alpha 0.5: red ~24; a white canvas would give red ~152
    assert (img[..., 0] < 60).mean() > 0.95 and (img[..., 2] > 100).mean() > 0.95


def test_allocator_tuning_is_scoped_to_the_predict_call(setup, monkeypatch):
    import wsi.runtime

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(wsi.runtime, "_libc", lambda: FakeLibc())
    import mil.models.base as base

    monkeypatch.setattr(base, "INSTANCE_CHUNK", 4)                   # chunked forward: no switch flipped
    setup["models"][0].predict_bag(torch.randn(30, DIM))
    assert calls == []
    predict_store(setup["store"], setup["run"], slides=["s2"], name="scoped", progress=False)
    assert calls[0] == ("mallopt", -3, 1 << 20) and calls[1:] == [("mallopt", -3, 128 * 1024), ("trim", 0)]


def test_heatmap_of_an_import_without_tile_size_says_why(tmp_path):
    store = TileStore.create(tmp_path / "s.zarr")
    view = store.add_slide("imp", np.array([[0, 0], [256, 0]]), kind="features-only")
    view.write_predictions("r", {"instance_score": np.zeros(2), "attention": np.ones(2)}, {})
    with pytest.raises(StoreError, match="'imp' records no tile size at level 0.*wsi import-h5 --overwrite"):
        write_heatmap(tmp_path / "s.zarr", "imp", tmp_path / "maps", run="r")
    assert not (tmp_path / "maps").exists()
