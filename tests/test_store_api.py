"""The store API: open vs create, schema-1 stores, damaged slides, interrupted labels, tile reads
(stored or through the real sample slide) against openslide."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_store
from wsi.store import FEATURES_ONLY, TILED, SlideMeta, StoreError, TileStore

DATA = Path(__file__).parent / "data"
STORE_V1 = DATA / "store_v1.zarr"


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


# ---- open / create ---------------------------------------------------------------------------------
def test_open_never_creates(tmp_path):
    missing = tmp_path / "typo.zarr"
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"typo.zarr: no tile store here; create one with `wsi tile"):
            TileStore.open(missing, readonly=readonly)
    assert not missing.exists() and list(tmp_path.iterdir()) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="not a tile store"):
        TileStore.open(empty)
    assert list(empty.iterdir()) == []

    store = TileStore.create(missing)
    assert len(store) == 0 and (missing / "zarr.json").is_file()
    store.add_slide("a", np.zeros((2, 2)))
    assert TileStore.create(missing).slide_ids() == ["a"]           # create reopens, keeps what is there
    assert TileStore.open(missing, readonly=True)["a"].n_tiles == 2
    assert TileStore.create(empty).slide_ids() == []                 # an empty folder may become a store


# ---- schema 1 (pathmil 0.1) ----------------------------------------------------------------------------
def v1_values():
    spec = importlib.util.spec_from_file_location("make_store_v1", DATA / "make_store_v1.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.tiled_values(), mod.imported_values()


def check_v1_content(store: TileStore) -> None:
    (coords, tiles, feats, labels, score), (icoords, ifeats) = v1_values()
    assert store.slide_ids() == ["imported_b", "tiled_a"] and store.complete_ids() == ["imported_b", "tiled_a"]
    a = store["tiled_a"]
    m = a.meta
    assert (m.kind, m.status, m.target_mpp, m.slide_mpp, m.patch_size, m.tile_size_level0) == \
        (TILED, "complete", 0.5, 0.25, 16, 32)
    assert (m.width, m.height, m.n_tiles, m.tiles_stored, m.tile_codec) == (96, 64, 5, True, "lossless")
    assert m.source == "/data/slides/tiled_a.svs" and m.fingerprint == "1234:abcdef0123456789"
    assert m.provenance["vendor"] == "aperio" and m.provenance["read_method"] == "openslide"
    assert m.provenance["tissue_params"] == {"seg_mpp": 8.0}
    np.testing.assert_array_equal(a.coords, coords)
    np.testing.assert_array_equal(a.read_tiles(np.arange(a.n_tiles)), tiles)
    np.testing.assert_array_equal(a.read_tiles([4, 1]), tiles[[4, 1]])
    assert a.feature_names() == ["timm_resnet18"]
    f = a.features("timm:resnet18")
    assert f.dtype == np.float16
    np.testing.assert_array_equal(f, feats)
    assert a.feature_meta("timm:resnet18")["weights"] == "sha256:00"
    np.testing.assert_array_equal(a.labels("tumor"), labels)
    assert a.label_names() == ["tumor"] and a.label_meta("tumor")["n_positive"] == 2
    arrays, attrs = a.predictions("abmil")
    np.testing.assert_array_equal(arrays["instance_score"], score)
    assert attrs["bag_probs"] == [0.2, 0.8]
    top = a.top_tiles("abmil", k=2)
    assert top.indices.tolist() == [0, 1] and top.coords.tolist() == coords[:2].tolist()
    mask, mask_attrs = a.tissue()
    assert mask.shape == (4, 6) and mask_attrs["downsample"] == [16.0, 16.0]

    b = store["imported_b"]
    m = b.meta
    assert (m.kind, m.status, m.target_mpp, m.patch_size, m.tile_size_level0, m.width, m.height) == \
        (FEATURES_ONLY, "complete", 0.5, 256, 512, 1024, 1024)
    assert m.mpp_approximate and not m.tiles_stored and m.tile_codec is None and m.n_tiles == 3
    assert m.provenance["imported_from"] == "clam" and m.provenance["h5_coords_attrs"]["patch_level"] == 0
    np.testing.assert_array_equal(b.coords, icoords)
    np.testing.assert_array_equal(b.features("uni"), ifeats)
    assert b.feature_meta("uni")["imported_from"] == "clam"
    assert b.tissue() is None and b.labels("tumor") is None
    with pytest.raises(StoreError, match="never stored"):
        b.read_tiles([0])


def test_schema1_store_reads_without_change():
    before = tree_digest(STORE_V1)
    store = TileStore.open(STORE_V1, readonly=True)
    check_v1_content(store)
    assert tree_digest(STORE_V1) == before                     # read-only: nothing migrated on disk


def test_schema1_store_migrates_when_opened_for_writing(tmp_path):
    old = TileStore.open(STORE_V1, readonly=True)
    metas = {sid: old[sid].meta for sid in old.slide_ids()}
    path = tmp_path / "v1.zarr"
    shutil.copytree(STORE_V1, path)
    store = TileStore.open(path)
    root = json.loads((path / "zarr.json").read_text())["attributes"]
    assert root["pathmil_schema"] == 2 and root["migrated_from_schema"] == 1
    for sid in ("tiled_a", "imported_b"):  # slide attributes now carry the typed names
        attrs = json.loads((path / "slides" / sid / "zarr.json").read_text())["attributes"]
        assert {"kind", "target_mpp", "tile_size_level0", "width", "height"} <= set(attrs)
    check_v1_content(store)
    reopened = TileStore.open(path, readonly=True)
    check_v1_content(reopened)
    assert {sid: reopened[sid].meta for sid in reopened.slide_ids()} == metas   # nothing lost or changed
    # and it takes new writes like any schema-2 store
    reopened_w = TileStore.open(path)
    reopened_w["tiled_a"].write_labels("stroma", np.ones(5), {})
    assert TileStore.open(path, readonly=True)["tiled_a"].label_names() == ["stroma", "tumor"]


# ---- damage and interruption ---------------------------------------------------------------------
def test_damaged_slide_is_reported_never_taken_for_absent(tmp_path):
    store = make_store(tmp_path / "s.zarr", {"good": 3, "bad": 2})
    (tmp_path / "s.zarr" / "slides" / "bad" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    store = TileStore.open(tmp_path / "s.zarr")
    assert store.slide_ids() == ["bad", "good"]            # one damaged slide hides no other
    with pytest.raises(StoreError, match="'bad' is damaged"):
        store.status("bad")
    with pytest.raises(StoreError, match="damaged"):
        store["bad"]
    assert store.status("good") == "complete" and store.complete_ids() == ["good"]
    info = {s["id"]: s for s in store.info()}
    assert info["bad"]["status"] == "damaged" and "JSONDecodeError" in info["bad"]["error"]
    assert info["good"]["status"] == "complete" and info["good"]["n_tiles"] == 3
    store.begin_slide(SlideMeta("bad"))                     # redoing it replaces the damaged group
    assert store.status("bad") == "writing"


def test_status_is_one_lookup_not_a_listing(tmp_path, monkeypatch):
    """complete_ids() / status() on a cohort: one listing in all, not one per slide (quadratic)."""
    store = make_store(tmp_path / "s.zarr", {f"s{i}": 1 for i in range(6)})
    store.begin_slide(SlideMeta("w"))
    calls = []
    listing = TileStore.slide_ids
    monkeypatch.setattr(TileStore, "slide_ids", lambda self: calls.append(1) or listing(self))
    assert store.complete_ids() == [f"s{i}" for i in range(6)] and len(calls) == 1
    assert [store.status(s) for s in ("s0", "w", "absent")] == ["complete", "writing", None] and len(calls) == 1


def test_interrupted_labels_never_read_as_negative(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s.zarr", {"a": 4}, labels={"tumor": {"a": [1, 1, 0, 1]}})

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("zarr.Array.__setitem__", killed)
    with pytest.raises(KeyboardInterrupt):
        store["a"].write_labels("stroma", np.ones(4), {})
    with pytest.raises(KeyboardInterrupt):
        store["a"].write_labels("tumor", np.zeros(4), {})    # a rewrite interrupted as well
    monkeypatch.undo()
    view = TileStore.open(tmp_path / "s.zarr", readonly=True)["a"]
    assert view.label_names() == []
    for name in ("stroma", "tumor"):
        with pytest.raises(StoreError, match=f"labels '{name}' of slide 'a' were interrupted"):
            view.labels(name)
    from wsi.data import TileDataset

    ds = TileDataset(view.store, [("a", 0)], labels="tumor")
    with pytest.raises(StoreError, match="interrupted"):
        ds[0]


# ---- tiles ------------------------------------------------------------------------------------------
def test_read_tiles_stored_codecs_and_order(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.clip(rng.normal(160, 20, (20, 1, 1, 3)) + np.linspace(0, 40, 32)[None, :, None, None], 0, 255)
    tiles = np.broadcast_to(smooth, (20, 32, 32, 3)).astype(np.uint8).copy()
    store = make_store(tmp_path / "s.zarr", {"l": {"n": 20, "tile_codec": "lossless"},
                                             "j": {"n": 20, "tile_codec": "jpeg-95"}, "f": 3},
                       tiles={"l": tiles, "j": tiles})
    order = rng.permutation(20)[:9]
    np.testing.assert_array_equal(store["l"].read_tiles(order), tiles[order])
    j = store["j"].read_tiles(order)
    assert j.shape == (9, 32, 32, 3) and j.dtype == np.uint8
    assert np.abs(j.astype(int) - tiles[order]).mean() < 2
    assert store["j"].meta.tile_codec == "jpeg-95" and store["l"].meta.tile_codec == "lossless"
    assert store["l"].read_tiles([]).shape == (0, 32, 32, 3)
    with pytest.raises(IndexError):
        store["l"].read_tiles([20])
    with pytest.raises(StoreError, match="not stored and its slide file /slides/f.svs is gone"):
        store["f"].read_tiles([0])
    imp = store.add_slide("imp", np.zeros((2, 2)), kind=FEATURES_ONLY)
    with pytest.raises(StoreError, match="pixels were never stored"):
        imp.read_tiles([1])


def openslide_tiles(slide_path: Path, meta: SlideMeta, coords: np.ndarray) -> np.ndarray:
    """The reference: openslide's read_region at level 0 (side tile_size_level0), resized to the patch size."""
    import cv2
    import openslide

    out = []
    with openslide.OpenSlide(str(slide_path)) as s:
        for x, y in coords:
            side = meta.tile_size_level0
            region = np.asarray(s.read_region((int(x), int(y)), 0, (side, side)).convert("RGB"))
            out.append(cv2.resize(region, (meta.patch_size, meta.patch_size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


@pytest.mark.parametrize("codec", ["lossless", "jpeg", "none"])
def test_read_tiles_match_openslide_on_the_real_slide(cmu_tiled, cmu_slide, codec):
    store = TileStore.open(cmu_tiled(codec), readonly=True)
    view = store["cmu_small_region"]
    m = view.meta
    assert (m.target_mpp, m.patch_size, m.slide_mpp) == (0.5, 256, pytest.approx(0.499, abs=1e-3))
    assert m.tile_size_level0 == 257 and (m.width, m.height) == (2220, 2967)
    assert view.has_tiles == (codec != "none") and m.tile_codec == {"none": None, "jpeg": "jpeg-90"}.get(codec, codec)
    idx = np.random.default_rng(1).permutation(view.n_tiles)[:6]
    got = view.read_tiles(idx)
    ref = openslide_tiles(cmu_slide, m, view.coords[idx])
    assert got.shape == ref.shape == (6, 256, 256, 3)
    diff = np.abs(got.astype(np.int16) - ref)
    if codec == "jpeg":
        # What JPEG q90 4:4:4 costs on this slide's fine texture (~3.1 grey levels over all its tiles;
        # 4.5 with 4:2:0), and no more: the stored tiles are the reference tiles through that codec.
        import imagecodecs

        assert 0 < diff.mean() < 4
        q = int(m.tile_codec.split("-")[1])
        through_codec = np.stack([imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(t, level=q, subsampling="444"))
                                  for t in ref])
        assert np.abs(got.astype(np.int16) - through_codec).mean() < 0.2
    else:
        assert diff.max() == 0
