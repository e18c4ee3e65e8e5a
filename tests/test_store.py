"""The tile store: slide ids can never escape it; status and schema."""
from __future__ import annotations

import json

import numpy as np
import pytest

from wsi.cohort import CohortError, resolve_sources
from wsi.store import COMPLETE, StoreError, TileStore, slide_id_from_path, validate_slide_id

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
    store = TileStore(tmp_path / "s.zarr")
    for bad in ESCAPES:
        with pytest.raises(ValueError):
            store.begin_slide(bad, {})
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["s.zarr"]


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
    store = TileStore(tmp_path / "s.zarr")
    store.begin_slide("s1", {"mpp": 0.5})
    assert store.status("s1") == "writing"
    store.write_slide_arrays("s1", np.zeros((3, 2), np.int32), np.ones((4, 4), np.uint8), {"downsample": [1, 1]}, 16)
    assert store.slide("s1")["tiles"].shape == (3, 16, 16, 3)
    store.mark_complete("s1", n_tiles=3)
    assert store.status("s1") == COMPLETE
    meta = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["pathmil_schema"] == 1
    info = TileStore(tmp_path / "s.zarr", mode="r").slide_info("s1")
    assert info["n_tiles"] == 3 and info["status"] == COMPLETE and info["features"] == []
    with pytest.raises(StoreError, match="no slide 'zz'"):
        store.slide("zz")
    with pytest.raises(StoreError, match="no tile store here"):
        TileStore(tmp_path / "absent.zarr", mode="r")


def test_refuses_to_adopt_other_folders(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a tile store"):
        TileStore(busy)
    import zarr

    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.create_group("stuff")
    with pytest.raises(StoreError, match="not a pathmil tile store"):
        TileStore(tmp_path / "other.zarr")
    assert "pathmil_schema" not in zarr.open_group(str(tmp_path / "other.zarr"), mode="r").attrs
