"""`wsi.data.TileDataset`: the tiles (and features, labels) of a store in a DataLoader, with fork and
spawn workers, stored tiles or tiles read through the real slide."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi.data import TileDataset
from wsi.errors import StoreError
from wsi.store import TileStore

N = {"a": 11, "b": 6, "c": 9}


@pytest.fixture()
def store(store_factory) -> TileStore:
    labels = {sid: np.arange(n, dtype=np.float32) / n for sid, n in N.items()}
    return store_factory(N, tiles=True, features={"enc": 5}, labels={"tumor": labels})


def expected(store: TileStore, items):
    """What the samples must hold, read straight through the views."""
    return {"image": np.stack([store[s].read_tiles([i])[0] for s, i in items]),
            "features": np.stack([store[s].features("enc")[i] for s, i in items]),
            "label": np.array([store[s].labels("tumor")[i] for s, i in items], np.float32)}


def test_samples_equal_the_views(store):
    items = [("b", 5), ("a", 0), ("c", 3), ("a", 10), ("b", 0), ("a", 4)]
    ds = TileDataset(store, items, features="enc", labels="tumor")
    want = expected(store, items)
    for k, (sid, i) in enumerate(items):
        s = ds[k]
        assert (s["slide_id"], s["index"]) == (sid, i)
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (16, 16, 3)
        np.testing.assert_array_equal(s["image"].numpy(), want["image"][k])
        np.testing.assert_array_equal(s["features"].numpy(), want["features"][k])
        assert s["label"].item() == pytest.approx(want["label"][k])
    # a batch keeps the order asked for, across slides and within one
    order = [3, 0, 5, 1, 4, 2]
    batch = ds.__getitems__(order)
    assert [(s["slide_id"], s["index"]) for s in batch] == [items[k] for k in order]
    np.testing.assert_array_equal(np.stack([s["image"].numpy() for s in batch]), want["image"][order])
    np.testing.assert_array_equal(np.stack([s["features"].numpy() for s in batch]), want["features"][order])


def test_for_slides_and_errors(store, tmp_path):
    ds = TileDataset.for_slides(tmp_path / "s.zarr", ["c", "a"])
    assert len(ds) == N["c"] + N["a"] and ds.items[0] == ("c", 0) and ds.items[-1] == ("a", N["a"] - 1)
    assert len(TileDataset.for_slides(store)) == sum(N.values())
    with pytest.raises(StoreError, match="no slide 'zz'"):
        TileDataset(store, [("zz", 0)])
    with pytest.raises(StoreError, match="no complete features for 'other'"):
        TileDataset(store, [("a", 0)], features="other")
    with pytest.raises(StoreError, match="no labels 'none'"):
        TileDataset(store, [("a", 0)], labels="none")[0]
    with pytest.raises(StoreError, match="no tile store here"):
        TileDataset(tmp_path / "typo.zarr", [("a", 0)])
    assert not (tmp_path / "typo.zarr").exists()


def to_gray(img):  # a picklable transform (spawned workers import it)
    return torch.from_numpy(np.asarray(img.convert("L"), np.float32))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(store, context):
    items = [(s, i) for s, n in N.items() for i in range(n)]
    items = [items[k] for k in np.random.default_rng(0).permutation(len(items))]
    ds = TileDataset(store, items, features="enc", labels="tumor")
    ds[0]  # the parent has opened the store: workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    want = expected(store, items)
    assert sum(len(b["slide_id"]) for b in batches) == len(items)
    got_ids = [(s, int(i)) for b in batches for s, i in zip(b["slide_id"], b["index"])]
    assert got_ids == items                                  # in order, across workers
    np.testing.assert_array_equal(torch.cat([b["image"] for b in batches]).numpy(), want["image"])
    np.testing.assert_array_equal(torch.cat([b["features"] for b in batches]).numpy(), want["features"])
    np.testing.assert_allclose(torch.cat([b["label"] for b in batches]).numpy(), want["label"])
    if context == "spawn":  # a transform travels to spawned workers
        gray = TileDataset(store, items[:6], to_gray)
        loader = torch.utils.data.DataLoader(gray, batch_size=3, num_workers=2, multiprocessing_context=context)
        got = torch.cat([b["image"] for b in loader])
        from PIL import Image

        ref = np.stack([np.asarray(Image.fromarray(t).convert("L"), np.float32) for t in want["image"][:6]])
        np.testing.assert_array_equal(got.numpy(), ref)


def test_tiles_through_the_slide_in_forked_workers(cmu_tiled):
    """A --no-tiles store: workers read through the slide file, each with its own handle."""
    lossless = TileStore.open(cmu_tiled("lossless"), readonly=True)
    none = TileStore.open(cmu_tiled("none"), readonly=True)
    n = none["cmu_small_region"].n_tiles
    idx = [int(i) for i in np.random.default_rng(2).permutation(n)[:8]]
    ds = TileDataset(none, [("cmu_small_region", i) for i in idx])
    ds[0]  # opens the slide in the parent first
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context="fork")
    got = torch.cat([b["image"] for b in loader]).numpy()
    np.testing.assert_array_equal(got, lossless["cmu_small_region"].read_tiles(idx))
