"""float16 features: `wsi embed --dtype float16` stores them at half size, `wsi import-h5` keeps the
float16 of an h5 file, features beyond float16's range are refused, and MIL trains on float16 bags
exactly as on the float32 copies of their values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_store
from mil.cohort import load_cohort
from mil.config import TrainConfig
from mil.train import train_cohort
from test_mil_train import SMALL, separable_bags
from wsi.cli import main
from wsi.embed import EmbedConfig, embed_store
from wsi.interop import import_h5
from wsi.store import TileStore

h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    """A small timm model's fixed weights, and the same with its last block shifted so that its features
    exceed float16's range: {"plain": path, "huge": path}."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    d = tmp_path_factory.mktemp("w")
    save_file(state, str(d / "plain.safetensors"))
    huge = {**state, "layer4.0.bn2.bias": torch.full_like(state["layer4.0.bn2.bias"], 1e6)}   # features ~1e6
    save_file(huge, str(d / "huge.safetensors"))
    return {"plain": str(d / "plain.safetensors"), "huge": str(d / "huge.safetensors")}


def test_embed_float16_halves_the_features(tmp_path, weights):
    a = make_store(tmp_path / "a.zarr", {"s": 11}, tiles=True, tile_size=32).path
    b = make_store(tmp_path / "b.zarr", {"s": 11}, tiles=True, tile_size=32).path
    common = ["-q", "embed", "--encoder", "timm:resnet10t", "--weights", weights["plain"], "--device", "cpu",
              "--no-progress"]
    assert main([*common, str(a)]) == 0
    assert main([*common, str(b), "--dtype", "float16"]) == 0
    full, half = (TileStore.open(p, readonly=True)["s"] for p in (a, b))
    f32, f16 = full.features("timm:resnet10t"), half.features("timm:resnet10t")
    assert f32.dtype == np.float32 and f16.dtype == np.float16 and f16.shape == f32.shape == (11, 512)
    assert half.feature_meta("timm:resnet10t")["dtype"] == "float16"
    assert f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2e-3, atol=1e-4)   # float16 rounding only


def test_features_beyond_float16_are_refused(tmp_path, weights):
    store = make_store(tmp_path / "s.zarr", {"s": 3}, tiles=True, tile_size=32)
    res = embed_store(store.path, EmbedConfig("timm:resnet10t", weights=weights["huge"], device="cpu",
                                              dtype="float16"), progress=False)
    assert [r.status for r in res] == ["failed"]
    assert "beyond float16's range" in res[0].error and "--dtype float32" in res[0].error
    assert not TileStore.open(store.path, readonly=True)["s"].has_features("timm:resnet10t")
    ok = embed_store(store.path, EmbedConfig("timm:resnet10t", weights=weights["huge"], device="cpu"), progress=False)
    assert [r.status for r in ok] == ["embedded"]                  # float32 holds them


def test_import_keeps_float16_and_mil_reads_it(tmp_path):
    bags = separable_bags(12, seed=2)
    (tmp_path / "clam" / "h5_files").mkdir(parents=True)
    for b in bags:
        with h5py.File(tmp_path / "clam" / "h5_files" / f"{b.slide_id}.h5", "w") as f:
            f["features"] = b.features.astype(np.float16)
            f["coords"] = b.coords * 256
    import_h5(tmp_path / "clam", tmp_path / "s.zarr", "toy", progress=False)
    view = TileStore.open(tmp_path / "s.zarr", readonly=True)[bags[0].slide_id]
    assert view.features("toy").dtype == np.float16
    np.testing.assert_array_equal(view.features("toy"), bags[0].features.astype(np.float16))
    assert view.feature_meta("toy")["h5_dtype"] == "float16"

    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"{b.slide_id},{'tumor' if b.label else 'normal'}\n" for b in bags))
    exact = make_store(tmp_path / "f32.zarr", {b.slide_id: {"coords": b.coords} for b in bags},
                       features={"toy": {b.slide_id: b.features.astype(np.float16).astype(np.float32) for b in bags}})
    cfg = TrainConfig(model_kwargs=SMALL["abmil"], epochs=3, min_epochs=1, folds=2, lr=1e-3, device="cpu")
    runs = {}
    for name, kw in (("f16", {"store": tmp_path / "s.zarr", "cache_gb": 0}), ("f16-held", {"store": tmp_path / "s.zarr"}),
                     ("h5", {"h5_dir": tmp_path / "clam", "cache_gb": 0}), ("f32", {"store": exact.path})):
        c = load_cohort(labels, encoder="toy", progress=False, **kw)
        assert c.dim == 16 and c.bags[0].features.dtype == (np.float32 if name in ("h5", "f32") else np.float16)
        runs[name] = train_cohort(c, cfg, tmp_path / name, progress=False)
    assert runs["f16"]["bag_auc"] == runs["f16-held"]["bag_auc"] == runs["h5"]["bag_auc"] == runs["f32"]["bag_auc"]
    assert runs["f16"]["best_epochs"] == runs["f32"]["best_epochs"]
