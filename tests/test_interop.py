"""CLAM / TRIDENT feature folders <-> the tile store.

Fixtures are written the way the tools themselves write them (names confirmed in their code):
CLAM utils/file_utils.py save_hdf5 (chunks of 32 rows, resizable), wsi_core/WholeSlideImage.py
process_contour (coords attrs), extract_features_fp.py (h5_files/ + pt_files/, coords int32, no attrs);
TRIDENT trident/IO.py save_h5 + coords_to_h5 and trident/wsi_objects/WSI.py extract_patch_features.
"""
from __future__ import annotations

import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py", reason="wsi.interop needs h5py")
torch = pytest.importorskip("torch")

from wsi.errors import PathmilError  # noqa: E402
from wsi.h5 import H5Error, detect_layout, read_h5_bag  # noqa: E402
from wsi.interop import export_h5, import_h5  # noqa: E402
from wsi.store import StoreError, TileStore  # noqa: E402

SLIDES = ["TCGA-A1.slide-1", "case_2", "case3"]
DIM = 24


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def _grid(n: int, step: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.choice(400, size=n, replace=False)
    return np.stack([(cells % 20) * step + 1000, (cells // 20) * step + 2000], 1)


def clam_save_hdf5(path: Path, assets: dict, attrs: dict | None = None, mode: str = "w", chunk: int = 32) -> None:
    """CLAM's utils/file_utils.py save_hdf5, as it writes."""
    with h5py.File(path, mode) as f:
        for key, val in assets.items():
            if key not in f:
                d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                     chunks=(chunk,) + val.shape[1:], dtype=val.dtype)
                d[:] = val
                for k, v in ((attrs or {}).get(key) or {}).items():
                    d.attrs[k] = v
            else:
                d = f[key]
                d.resize(len(d) + val.shape[0], axis=0)
                d[-val.shape[0]:] = val


def trident_save_h5(path: Path, assets: dict, attributes: dict) -> None:
    """TRIDENT's trident/IO.py save_h5 (chunks of 1 row; None attrs stored as the string 'None')."""
    with h5py.File(path, "w") as f:
        for key, val in assets.items():
            d = f.create_dataset(key, shape=val.shape, maxshape=(None,) + val.shape[1:],
                                 chunks=(1,) + val.shape[1:], dtype=val.dtype)
            d[:] = val
            for k, v in attributes.get(key, {}).items():
                d.attrs[k] = "None" if v is None else v


def make_clam(root: Path, slides=SLIDES, shift: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """create_patches_fp.py (patches/, patch_level 1 at downsample 4) + extract_features_fp.py output."""
    for d in ("patches", "h5_files", "pt_files"):
        (root / d).mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, sid in enumerate(slides):
        n = 40 + 7 * i
        coords = _grid(n, 1024, i) + shift
        attr = {"patch_size": 256, "patch_level": 1, "downsample": (4.0, 4.0),
                "downsampled_level_dim": (5000, 4000), "level_dim": (5000, 4000), "name": sid,
                "save_path": str(root / "patches")}
        clam_save_hdf5(root / "patches" / f"{sid}.h5", {"coords": coords}, {"coords": attr})
        feats = _rng(sid).standard_normal((n, DIM)).astype(np.float32)
        out = root / "h5_files" / f"{sid}.h5"
        for k, s in enumerate(range(0, n, 16)):      # batch by batch, as compute_w_loader does
            clam_save_hdf5(out, {"features": feats[s:s + 16], "coords": coords[s:s + 16].astype(np.int32)},
                           None, mode="w" if k == 0 else "a")
        torch.save(torch.from_numpy(feats), root / "pt_files" / f"{sid}.pt")
        truth[sid] = (feats, coords)
    return truth


def make_trident(job: Path, encoder: str = "uni_v1", slides=SLIDES[:2], coords_dir="20x_256px_0px_overlap",
                 dim: int = DIM, dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """run_batch_of_slides.py --task coords/feat: <coords_dir>/patches and <coords_dir>/features_<encoder>."""
    base = job / coords_dir
    (base / "patches").mkdir(parents=True, exist_ok=True)
    feat_dir = base / f"features_{encoder}"
    feat_dir.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i, sid in enumerate(slides):
        n = 30 + 5 * i
        coords = _grid(n, 512, 10 + i).astype(np.int32)
        cattrs = {"patch_size": 256, "patch_size_level0": 256 * 40 // 20, "level0_magnification": 40,
                  "target_magnification": 20, "overlap": 0, "name": sid, "savetodir": str(base),
                  "level0_width": 30000, "level0_height": 20000}
        trident_save_h5(base / "patches" / f"{sid}_patches.h5", {"coords": coords}, {"coords": cattrs})
        feats = _rng(sid + encoder).standard_normal((n, dim)).astype(dtype)
        trident_save_h5(feat_dir / f"{sid}.h5", {"features": feats, "coords": coords},
                        {"features": {"name": sid, "savetodir": str(feat_dir), "encoder": encoder},
                         "coords": cattrs})
        truth[sid] = (feats, coords)
    # slide-level features sit beside the patch features and must not be taken for them
    sf = base / "slide_features_titan"
    sf.mkdir(exist_ok=True)
    trident_save_h5(sf / f"{slides[0]}.h5", {"features": np.zeros(8, np.float32), "coords": np.zeros((1, 2), np.int32)},
                    {"features": {"name": slides[0]}})
    return truth


# ---- layout ------------------------------------------------------------------------------------------
def test_detect_layout(tmp_path):
    make_clam(tmp_path / "clam")
    make_trident(tmp_path / "job")
    assert detect_layout(tmp_path / "clam") == "clam"
    assert detect_layout(tmp_path / "clam" / "h5_files") == "clam"
    assert detect_layout(tmp_path / "job") == "trident"
    assert detect_layout(tmp_path / "job" / "20x_256px_0px_overlap") == "trident"
    assert detect_layout(tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1") == "trident"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: neither a CLAM"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(ValueError, match="nope: not a folder"):
        detect_layout(tmp_path / "nope")


# ---- import --------------------------------------------------------------------------------------------
def test_import_clam(tmp_path):
    truth = make_clam(tmp_path / "clam")
    res = import_h5(tmp_path / "clam", tmp_path / "s.zarr", "resnet50_trunc", progress=False)
    assert [(r.slide_id, r.status) for r in res] == [(s, "imported") for s in sorted(SLIDES)]
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    for sid, (feats, coords) in truth.items():
        assert r_n(res, sid) == len(coords)
        view = store[sid]
        assert view.coords.dtype == np.int64
        np.testing.assert_array_equal(view.coords, coords)
        np.testing.assert_array_equal(view.features("resnet50_trunc"), feats)
        m = view.meta
        assert m.status == "complete" and m.kind == "features-only" and m.tiles_stored is False
        assert m.provenance["imported_from"] == "clam"
        assert m.provenance["h5_coords_attrs"] == {"patch_level": 1, "downsample": [4.0, 4.0]}
        assert m.source == str((tmp_path / "clam" / "h5_files" / f"{sid}.h5").resolve())
        assert m.patch_size == 256 and m.tile_size_level0 == 1024   # 256 px at level 1, downsample 4
        assert m.target_mpp is None and m.slide_mpp is None and m.mpp_approximate is False
        assert m.width is None and m.height is None                 # CLAM does not record it: never guessed
        assert m.n_tiles == len(coords)
        info = view.info()
        assert info["features"] == ["resnet50_trunc"] and info["n_tiles"] == len(coords) and not info["tiles"]
        fa = view.feature_meta("resnet50_trunc")
        assert fa["imported_from"] == "clam" and fa["source"].endswith(f"{sid}.h5") and fa["complete"]
        assert fa["dim"] == DIM and fa["h5_dtype"] == "float32"
        with pytest.raises(StoreError, match="imported with features only, so its pixels were never stored"):
            view.read_tiles([0])


def r_n(results, sid):
    return next(r.n for r in results if r.slide_id == sid)


def test_import_clam_without_patches_and_given_mpp(tmp_path):
    truth = make_clam(tmp_path / "clam")
    shutil.rmtree(tmp_path / "clam" / "patches")
    import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", mpp=0.5, progress=False)
    view = TileStore.open(tmp_path / "s.zarr", readonly=True)[SLIDES[0]]
    m = view.meta
    assert m.target_mpp == 0.5 and m.mpp_approximate is False
    assert m.slide_mpp is None                                          # not derived from the target
    assert m.patch_size is None and m.tile_size_level0 is None          # unknown without patches/
    np.testing.assert_array_equal(view.features("r50"), truth[SLIDES[0]][0])


@pytest.mark.parametrize("where", ["job", "coords_dir", "features_dir"])
def test_import_trident(tmp_path, where):
    truth = make_trident(tmp_path / "job")
    root = {"job": tmp_path / "job", "coords_dir": tmp_path / "job" / "20x_256px_0px_overlap",
            "features_dir": tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"}[where]
    res = import_h5(root, tmp_path / "s.zarr", "uni", progress=False)
    assert sorted((r.slide_id, r.status) for r in res) == sorted((s, "imported") for s in truth)
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    for sid, (feats, coords) in truth.items():
        view = store[sid]
        np.testing.assert_array_equal(view.coords, coords)
        np.testing.assert_array_equal(view.features("uni"), feats)
        m = view.meta
        assert m.kind == "features-only" and m.provenance["imported_from"] == "trident"
        assert m.provenance["h5_coords_attrs"] == {"target_magnification": 20, "level0_magnification": 40}
        assert m.target_mpp == pytest.approx(0.5) and m.mpp_approximate is True   # 10 / target_magnification
        assert m.patch_size == 256 and m.tile_size_level0 == 512
        assert m.overlap == 0 and (m.width, m.height) == (30000, 20000)
        fa = view.feature_meta("uni")
        assert fa["original_encoder"] == "uni_v1" and fa["imported_from"] == "trident"
        assert view.feature_names() == ["uni"]


def test_import_trident_given_mpp_and_float16(tmp_path):
    truth = make_trident(tmp_path / "job", dtype=np.float16)
    import_h5(tmp_path / "job", tmp_path / "s.zarr", "uni_v1", mpp=0.48, progress=False)
    view = TileStore.open(tmp_path / "s.zarr", readonly=True)[SLIDES[0]]
    sid = SLIDES[0]
    assert view.meta.target_mpp == 0.48 and view.meta.mpp_approximate is False
    got = view.features("uni_v1")
    assert got.dtype == np.float16   # kept at half size, as the file had it
    np.testing.assert_array_equal(got.astype(np.float32), truth[sid][0].astype(np.float32))


def test_trident_with_several_encoders_picks_the_named_one(tmp_path):
    make_trident(tmp_path / "job", encoder="uni_v1")
    conch = make_trident(tmp_path / "job", encoder="conch_v15", dim=16)
    with pytest.raises(ValueError, match="2 TRIDENT feature folders.*none named features_resnet"):
        import_h5(tmp_path / "job", tmp_path / "s.zarr", "resnet", progress=False)
    import_h5(tmp_path / "job", tmp_path / "s.zarr", "conch_v15", progress=False)
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    np.testing.assert_array_equal(store[SLIDES[0]].features("conch_v15"), conch[SLIDES[0]][0])


def test_reimport_skips_complete_features(tmp_path):
    make_clam(tmp_path / "clam")
    import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", progress=False)
    again = import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", progress=False)
    assert {r.status for r in again} == {"skipped"}
    assert all(r.n > 0 for r in again)
    redo = import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", overwrite=True, progress=False)
    assert {r.status for r in redo} == {"imported"}
    # a second encoder on the same slides: the coords match, so only features are added
    other = import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50_copy", progress=False)
    assert {r.status for r in other} == {"imported"}
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    assert store[SLIDES[0]].feature_names() == ["r50", "r50_copy"]


def test_bad_files_are_reported_and_the_rest_imported(tmp_path, caplog):
    truth = make_clam(tmp_path / "clam")
    h5 = tmp_path / "clam" / "h5_files"
    good = (h5 / f"{SLIDES[0]}.h5").read_bytes()
    (h5 / "truncated.h5").write_bytes(good[: len(good) // 2])
    (h5 / "not_h5.h5").write_bytes(b"this is not an hdf5 file at all")
    with h5py.File(h5 / "mismatch.h5", "w") as f:
        f["features"] = np.zeros((10, DIM), np.float32)
        f["coords"] = np.zeros((9, 2), np.int32)
    with h5py.File(h5 / "nofeats.h5", "w") as f:
        f["coords"] = np.zeros((9, 2), np.int32)
    shutil.copy(h5 / f"{SLIDES[1]}.h5", h5 / "bad name.h5")
    with caplog.at_level(logging.ERROR, logger="wsi.interop"):
        res = import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", progress=False)
    by = {r.slide_id: r for r in res}
    assert {s for s, r in by.items() if r.status == "imported"} == set(SLIDES)
    failed = {s: r.error for s, r in by.items() if r.status == "failed"}
    assert set(failed) == {"truncated", "not_h5", "mismatch", "nofeats", "bad name"}
    assert failed["truncated"].startswith("truncated.h5: ") and "HDF5" in failed["truncated"]
    assert failed["not_h5"].startswith("not_h5.h5: ")
    assert "10 rows but 'coords' has 9" in failed["mismatch"]
    assert "no 'features' dataset" in failed["nofeats"]
    assert "invalid slide id" in failed["bad name"]
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    for name in ("truncated.h5", "not_h5.h5", "mismatch.h5", "nofeats.h5", "bad name.h5"):
        assert name in logged
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    assert store.slide_ids() == sorted(SLIDES)           # nothing half-written for the bad ones
    for sid, (feats, _) in truth.items():
        np.testing.assert_array_equal(store[sid].features("r50"), feats)


def test_coords_that_differ_from_a_complete_slide_fail_that_slide(tmp_path):
    truth = make_clam(tmp_path / "a")
    import_h5(tmp_path / "a", tmp_path / "s.zarr", "r50", progress=False)
    make_clam(tmp_path / "b", slides=[SLIDES[0]], shift=16)          # same slide, other tiles
    shutil.copytree(tmp_path / "a", tmp_path / "b2")                  # the same slides, features...
    shutil.copy(tmp_path / "b" / "h5_files" / f"{SLIDES[0]}.h5", tmp_path / "b2" / "h5_files")  # ...but one
    make_clam(tmp_path / "n", slides=["new_slide"])
    shutil.copy(tmp_path / "n" / "h5_files" / "new_slide.h5", tmp_path / "b2" / "h5_files")
    res = import_h5(tmp_path / "b2", tmp_path / "s.zarr", "other", progress=False)
    by = {r.slide_id: r for r in res}
    assert by[SLIDES[0]].status == "failed"
    assert "coords differ" in by[SLIDES[0]].error and "new store" in by[SLIDES[0]].error
    assert {s: r.status for s, r in by.items() if s != SLIDES[0]} == {SLIDES[1]: "imported", SLIDES[2]: "imported",
                                                                       "new_slide": "imported"}
    store = TileStore.open(tmp_path / "s.zarr", readonly=True)
    np.testing.assert_array_equal(store[SLIDES[0]].coords, truth[SLIDES[0]][1])   # untouched
    assert store[SLIDES[0]].feature_names() == ["r50"]
    # a different number of tiles says so too
    make_clam(tmp_path / "c", slides=["x", "y", SLIDES[0]])
    res = import_h5(tmp_path / "c", tmp_path / "s.zarr", "r50", overwrite=True, progress=False)
    err = next(r.error for r in res if r.slide_id == SLIDES[0])
    assert "coords differ" in err and "tiles in the store" in err


# ---- export and round trip -----------------------------------------------------------------------------
def _tiled_store(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A store as `wsi tile` + `wsi embed` leave it (0.25 µm/px slides tiled at 0.5, 256 px)."""
    from wsi.store import SlideMeta

    store = TileStore.create(path)
    truth = {}
    for i, sid in enumerate(["s1", "s2", "s3"]):
        coords = _grid(20 + i, 512, 30 + i).astype(np.int32)
        view = store.add_slide(sid, coords, source=f"/data/{sid}.svs", slide_mpp=0.25, target_mpp=0.5,
                               patch_size=256, width=40000, height=30000)
        if sid != "s3":
            feats = _rng(sid).standard_normal((len(coords), DIM)).astype(np.float32)
            view.write_features("uni_v1", feats, {"dim": DIM})
            truth[sid] = (feats, coords)
    store.begin_slide(SlideMeta("s4"))   # never completed: not exported, not warned about
    return truth


def test_export_contents(tmp_path, caplog):
    truth = _tiled_store(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING, logger="wsi.interop"):
        res = export_h5(tmp_path / "s.zarr", "uni_v1", tmp_path / "out", progress=False)
    assert [(r.slide_id, r.status, r.n) for r in res] == [("s1", "exported", 20), ("s2", "exported", 21)]
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and "s3" in warns[0] and "s4" not in warns[0]
    assert sorted(p.name for p in (tmp_path / "out" / "h5_files").iterdir()) == ["s1.h5", "s2.h5"]
    assert sorted(p.name for p in (tmp_path / "out" / "pt_files").iterdir()) == ["s1.pt", "s2.pt"]
    for sid, (feats, coords) in truth.items():
        with h5py.File(tmp_path / "out" / "h5_files" / f"{sid}.h5", "r") as f:
            assert f["features"].dtype == np.float32 and f["features"].shape == (len(coords), DIM)
            assert f["coords"].dtype == np.int64 and f["coords"].shape == (len(coords), 2)
            np.testing.assert_array_equal(f["features"][:], feats)
            np.testing.assert_array_equal(f["coords"][:], coords)
            a = dict(f["coords"].attrs)
            assert f["features"].attrs["encoder"] == "uni_v1"
        # CLAM-style readers: patch_size px at patch_level (downsample) x custom_downsample = level-0 extent
        assert a["patch_size"] == 256 and a["patch_level"] == 0 and list(a["downsample"]) == [1.0, 1.0]
        assert a["patch_size"] * a["downsample"][0] * a["custom_downsample"] == a["patch_size_level0"] == 512
        # TRIDENT's reader: patch_size at target_magnification, level0_magnification for the extent
        assert a["target_magnification"] == 20.0 and a["level0_magnification"] == 40.0
        assert a["mpp"] == 0.5 and a["slide_mpp"] == 0.25 and a["overlap"] == 0
        assert (a["level0_width"], a["level0_height"]) == (40000, 30000)
        pt = torch.load(tmp_path / "out" / "pt_files" / f"{sid}.pt", weights_only=True)
        assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and tuple(pt.shape) == feats.shape
        np.testing.assert_array_equal(pt.numpy(), feats)


def test_round_trip_store_export_import(tmp_path):
    truth = _tiled_store(tmp_path / "s.zarr")
    export_h5(tmp_path / "s.zarr", "uni_v1", tmp_path / "out", progress=False)
    assert detect_layout(tmp_path / "out") == "clam"
    res = import_h5(tmp_path / "out", tmp_path / "fresh.zarr", "uni_v1", progress=False)
    assert {r.status for r in res} == {"imported"}
    src = TileStore.open(tmp_path / "s.zarr", readonly=True)
    dst = TileStore.open(tmp_path / "fresh.zarr", readonly=True)
    assert dst.slide_ids() == sorted(truth)
    for sid in truth:
        a, b = src[sid], dst[sid]
        np.testing.assert_array_equal(b.coords, a.coords)
        np.testing.assert_array_equal(b.features("uni_v1"), a.features("uni_v1"))
        m = b.meta
        assert (m.patch_size, m.tile_size_level0, m.target_mpp, m.slide_mpp) == (256, 512, 0.5, 0.25)
        assert m.mpp_approximate is False and (m.width, m.height) == (40000, 30000)
    # and back into the store it came from: coords match, features already there -> skipped
    again = import_h5(tmp_path / "out", tmp_path / "s.zarr", "uni_v1", progress=False)
    assert {r.status for r in again} == {"skipped"}


@pytest.mark.parametrize("meta", [
    dict(target_mpp=0.5, slide_mpp=0.25, patch_size=256, tile_size_level0=512, width=40000, height=30000, overlap=0),
    dict(target_mpp=1.0, slide_mpp=0.2425, patch_size=224, tile_size_level0=924, width=98304, height=71168,
         overlap=32),
])
def test_export_import_round_trip_keeps_slide_meta(tmp_path, meta):
    """export-h5 then import-h5: every SlideMeta field the h5 attributes can carry comes back equal."""
    coords = _grid(12, 1024, 7).astype(np.int32)
    feats = _rng("meta").standard_normal((len(coords), DIM)).astype(np.float32)
    src = TileStore.create(tmp_path / "s.zarr")
    src.add_slide("s1", coords, source="/data/s1.svs", **meta).write_features("uni_v1", feats, {})
    export_h5(tmp_path / "s.zarr", "uni_v1", tmp_path / "out", progress=False)
    import_h5(tmp_path / "out", tmp_path / "b.zarr", "uni_v1", progress=False)
    a, b = src["s1"].meta, TileStore.open(tmp_path / "b.zarr", readonly=True)["s1"].meta
    for field in ("target_mpp", "slide_mpp", "patch_size", "tile_size_level0", "width", "height", "overlap",
                  "mpp_approximate"):
        assert getattr(b, field) == pytest.approx(getattr(a, field)), field
    assert b.target_mpp == meta["target_mpp"] and b.overlap == meta["overlap"]
    assert b.kind == "features-only" and a.kind == "tiled"
    assert b.source == str((tmp_path / "out" / "h5_files" / "s1.h5").resolve())


def test_import_refuses_a_path_that_is_not_a_store_and_creates_nothing(tmp_path):
    make_clam(tmp_path / "clam")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    with pytest.raises(StoreError, match="notes: exists and is not a tile store") as e:
        import_h5(tmp_path / "clam", other, "r50", progress=False)
    assert isinstance(e.value, PathmilError) and "\n" not in str(e.value)
    assert sorted(p.name for p in other.iterdir()) == ["a.txt"]
    # a folder that is neither layout fails before any store is made
    with pytest.raises(H5Error, match="nope: not a folder") as e:
        import_h5(tmp_path / "nope", tmp_path / "new.zarr", "r50", progress=False)
    assert isinstance(e.value, PathmilError) and not (tmp_path / "new.zarr").exists()
    # a new path is made into a store (the way to make a features-only store)
    res = import_h5(tmp_path / "clam", tmp_path / "new.zarr", "r50", progress=False)
    assert {r.status for r in res} == {"imported"}
    assert len(TileStore.open(tmp_path / "new.zarr", readonly=True)) == len(SLIDES)


def test_export_needs_an_existing_store(tmp_path):
    with pytest.raises(StoreError, match="no tile store here"):
        export_h5(tmp_path / "typo.zarr", "uni_v1", tmp_path / "out", progress=False)
    assert not (tmp_path / "typo.zarr").exists() and not (tmp_path / "out").exists()


def test_read_h5_bag_names_a_bad_file(tmp_path):
    truth = make_clam(tmp_path / "clam", slides=["a"])
    feats, coords = read_h5_bag(tmp_path / "clam" / "h5_files" / "a.h5")
    np.testing.assert_array_equal(feats, truth["a"][0])
    np.testing.assert_array_equal(coords, truth["a"][1])
    assert feats.dtype == np.float32 and coords.dtype == np.int64
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(H5Error, match=r"bad.h5: cannot open as HDF5.*re-extract its features") as e:
        read_h5_bag(bad)
    assert isinstance(e.value, ValueError) and isinstance(e.value, PathmilError)


def test_trident_round_trip_keeps_approximate_mpp(tmp_path):
    truth = make_trident(tmp_path / "job")
    import_h5(tmp_path / "job", tmp_path / "a.zarr", "uni_v1", progress=False)
    export_h5(tmp_path / "a.zarr", "uni_v1", tmp_path / "out", progress=False)
    import_h5(tmp_path / "out", tmp_path / "b.zarr", "uni_v1", progress=False)
    b = TileStore.open(tmp_path / "b.zarr", readonly=True)
    for sid, (feats, coords) in truth.items():
        view = b[sid]
        np.testing.assert_array_equal(view.features("uni_v1"), feats)
        np.testing.assert_array_equal(view.coords, coords)
        m = view.meta
        assert m.target_mpp == pytest.approx(0.5) and m.mpp_approximate is True and m.tile_size_level0 == 512
        assert view.feature_meta("uni_v1")["original_encoder"] == "uni_v1"
    with h5py.File(tmp_path / "out" / "h5_files" / f"{SLIDES[0]}.h5", "r") as f:
        assert f["coords"].attrs["level0_magnification"] == pytest.approx(40.0)


def test_export_with_nothing_to_export(tmp_path, caplog):
    TileStore.create(tmp_path / "s.zarr")
    with caplog.at_level(logging.WARNING, logger="wsi.interop"):
        assert export_h5(tmp_path / "s.zarr", "uni_v1", tmp_path / "out", progress=False) == []
    assert "nothing to export" in caplog.text


def test_clam_without_mpp_exports_legacy_attrs_only(tmp_path):
    truth = make_clam(tmp_path / "clam")
    import_h5(tmp_path / "clam", tmp_path / "s.zarr", "r50", progress=False)
    export_h5(tmp_path / "s.zarr", "r50", tmp_path / "out", progress=False)
    with h5py.File(tmp_path / "out" / "h5_files" / f"{SLIDES[0]}.h5", "r") as f:
        a = dict(f["coords"].attrs)
        np.testing.assert_array_equal(f["coords"][:], truth[SLIDES[0]][1])
    assert not {"mpp", "target_magnification", "level0_magnification"} & set(a)   # unknown: never guessed
    assert (a["patch_size"], a["patch_level"], a["custom_downsample"], a["patch_size_level0"]) == (256, 0, 4.0, 1024)
    res = import_h5(tmp_path / "out", tmp_path / "b.zarr", "r50", progress=False)
    assert {r.status for r in res} == {"imported"}
    m = TileStore.open(tmp_path / "b.zarr", readonly=True)[SLIDES[0]].meta
    assert (m.patch_size, m.tile_size_level0, m.target_mpp) == (256, 1024, None)


def test_trident_file_still_locked_is_not_imported(tmp_path):
    make_trident(tmp_path / "job")
    feat_dir = tmp_path / "job" / "20x_256px_0px_overlap" / "features_uni_v1"
    (feat_dir / f"{SLIDES[1]}.h5.lock").write_text("")
    res = {r.slide_id: r for r in import_h5(tmp_path / "job", tmp_path / "s.zarr", "uni", progress=False)}
    assert res[SLIDES[0]].status == "imported"
    assert res[SLIDES[1]].status == "failed" and "locked" in res[SLIDES[1]].error


def test_cli_import_into_a_folder_that_is_not_a_store(tmp_path, capsys):
    """`wsi import-h5 DIR --store NOT_A_STORE`: one line on stderr, exit 2, the folder untouched."""
    from wsi.cli import main

    make_clam(tmp_path / "clam")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("mine")
    assert main(["-q", "import-h5", str(tmp_path / "clam"), "--store", str(other), "--encoder", "r50"]) == 2
    err = capsys.readouterr().err
    assert "notes: exists and is not a tile store" in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in other.iterdir()) == ["a.txt"]


def test_cli_round_trip_and_embed_refuses_imported(tmp_path, cmu_slide):
    """wsi tile -> embed -> export-h5 -> import-h5 into a fresh store: same features and coords."""
    import subprocess
    import sys

    from wsi.store import TileStore

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "wsi.cli", "-q", *map(str, args)], capture_output=True, text=True)

    src = tmp_path / "src.zarr"
    assert cli("tile", cmu_slide, "--store", src, "--no-progress", "--workers", "1").returncode == 0
    assert cli("embed", src, "--encoder", "efficientnet-lite0", "--no-progress").returncode == 0
    r = cli("export-h5", src, "--encoder", "efficientnet-lite0", "--out", tmp_path / "clam")
    assert r.returncode == 0 and "1 slides exported" in r.stdout
    dst = tmp_path / "dst.zarr"
    r = cli("import-h5", tmp_path / "clam", "--store", dst, "--encoder", "effnet")
    assert r.returncode == 0 and "1 imported" in r.stdout, r.stderr
    a = TileStore.open(src, readonly=True)["cmu_small_region"]
    b = TileStore.open(dst, readonly=True)["cmu_small_region"]
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.features("efficientnet-lite0"), b.features("effnet"))
    for field in ("target_mpp", "slide_mpp", "patch_size", "tile_size_level0", "width", "height", "overlap"):
        assert getattr(b.meta, field) == getattr(a.meta, field), field
    r = cli("embed", dst, "--encoder", "efficientnet-lite0", "--no-progress")
    assert r.returncode == 1 and "no tile pixels to embed" in r.stdout + r.stderr
