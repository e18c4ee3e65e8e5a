"""The tile store: slide ids can never escape it; status and schema."""
from __future__ import annotations

import json

import numpy as np
import pytest

from wsi.cohort import CohortError, resolve_sources
from wsi.store import (COMPLETE, SCHEMA_VERSION, WRITING, SlideMeta, StoreError, TileStore, slide_id_from_path,
                       validate_slide_id)

ESCAPES = ["../evil", "..", ".", "/etc/passwd", "a/b", "a\\b", "", ".hidden", "x" * 201, "sp ace", "-flag"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_invalid_ids_rejected(bad):
    with pytest.raises(ValueError, match="invalid slide id"):
        validate_slide_id(bad)


def test_ids_from_file_names_are_sanitised():
    assert slide_id_from_path("/data/TCGA-A1 (copy).svs") == "TCGA-A1__copy_"
    assert slide_id_from_path("../../up.svs") == "up"   # only the file name counts, never the folders
    assert slide_id_from_path("/d/case.ome.tiff") == "case"
    for hopeless in ("/d/....svs", "x/../../..svs"):
        with pytest.raises(ValueError, match="cannot derive"):
            slide_id_from_path(hopeless)


def test_store_never_writes_outside(tmp_path):
    store = TileStore.create(tmp_path / "s.zarr")
    for bad in ESCAPES:
        with pytest.raises(ValueError):
            store.begin_slide(SlideMeta(bad))
        with pytest.raises(ValueError):
            store.add_slide(bad, np.zeros((1, 2)))
        with pytest.raises(ValueError):
            store[bad]
    view = store.add_slide("ok", np.zeros((2, 2)))
    for bad in ESCAPES:
        with pytest.raises(ValueError):
            view.write_labels(bad, np.zeros(2), {})
        with pytest.raises(ValueError):
            view.write_predictions(bad, {"s": np.zeros(2)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "slides").iterdir()) == ["ok", "zarr.json"]


def test_cohort_csv_with_escaping_id_is_rejected(tmp_path):
    csv = tmp_path / "cohort.csv"
    csv.write_text("path,slide_id\nslide.svs,../../outside\n")
    with pytest.raises(CohortError, match=r"cohort.csv, line 2: invalid slide id"):
        resolve_sources([csv])


def test_cohort_csv_paths_ids_mpp_and_duplicates(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    csv = tmp_path / "cohort.csv"
    csv.write_text("path,slide_id,mpp\na.svs,case_1,0.25\n/abs/b.tif,,\n")
    srcs = resolve_sources([csv], slide_mpp=0.5)
    assert [(s.slide_id, s.mpp) for s in srcs] == [("case_1", 0.25), ("b", 0.5)]
    assert srcs[0].path == tmp_path / "a.svs"
    csv.write_text("path,slide_id\na.svs,same\nb.svs,same\n")
    with pytest.raises(CohortError, match="used by both"):
        resolve_sources([csv])
    csv.write_text("file\na.svs\n")
    with pytest.raises(CohortError, match="'path' column"):
        resolve_sources([csv])


def test_status_lifecycle_and_schema(tmp_path):
    store = TileStore.create(tmp_path / "s.zarr")
    view = store.begin_slide(SlideMeta("s1", patch_size=16, target_mpp=0.5, slide_mpp=0.25, tile_size_level0=32))
    assert store.status("s1") == WRITING and store.status("absent") is None
    assert store.complete_ids() == []
    view.write_arrays(np.array([[0, 0], [32, 0], [64, 0]]), tissue=np.ones((4, 4), np.uint8),
                      tissue_attrs={"downsample": [8, 8]}, tile_codec="lossless")
    assert view.has_tiles and view.read_tiles(np.arange(view.n_tiles)).shape == (3, 16, 16, 3)
    assert not view.read_tiles(np.arange(view.n_tiles)).any()  # allocated, not yet written
    view.write_tiles(0, np.full((3, 16, 16, 3), 7, np.uint8))
    assert store.status("s1") == WRITING                   # arrays written, not yet marked
    view.mark_complete()
    assert store.status("s1") == COMPLETE and store.complete_ids() == ["s1"]
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["attributes"]["pathmil_schema"] == SCHEMA_VERSION == 2
    again = TileStore.open(tmp_path / "s.zarr", readonly=True)
    info = again["s1"].info()
    assert info["n_tiles"] == 3 and info["status"] == COMPLETE and info["features"] == []
    assert info["tile_codec"] == "lossless" and info["kind"] == "tiled"
    m = again["s1"].meta
    assert (m.n_tiles, m.tiles_stored, m.target_mpp, m.tile_size_level0) == (3, True, 0.5, 32)
    assert (again["s1"].read_tiles([2, 0]) == 7).all()
    with pytest.raises(StoreError, match="no slide 'zz'"):
        store["zz"]
    with pytest.raises(StoreError, match="opened read-only"):
        again.begin_slide(SlideMeta("s2"))
    store.mark_failed("s1", "boom: it broke", source="/x/s1.svs")
    assert store.status("s1") == "failed" and store["s1"].meta.error == "boom: it broke"
    assert store["s1"].n_tiles == 0 and store.complete_ids() == []


def test_refuses_to_adopt_other_folders(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    for make in (TileStore.create, TileStore.open):
        with pytest.raises(StoreError, match="not a tile store"):
            make(busy)
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    # a Zarr group of another program (written by hand: zarr v3 metadata is JSON)
    other = tmp_path / "other.zarr"
    (other / "stuff").mkdir(parents=True)
    group = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    (other / "zarr.json").write_text(group)
    (other / "stuff" / "zarr.json").write_text(group)
    for make in (TileStore.create, TileStore.open, lambda p: TileStore.open(p, readonly=True)):
        with pytest.raises(StoreError, match="not a pathmil tile store"):
            make(other)
    assert json.loads((other / "zarr.json").read_text())["attributes"] == {}
