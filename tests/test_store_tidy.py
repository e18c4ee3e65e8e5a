"""The store's manners: no global warnings filter, membership of invalid ids, prediction dtypes,
bounded tile reads."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from wsi.store import TILE_CHUNK, TileStore


def test_import_leaves_the_warnings_filters_alone_and_jpeg_tiles_warn_nothing(tmp_path):
    # numpy and zarr install their own filters at import; the store's own import must add none
    code = ("import warnings, numpy, zarr; before = list(warnings.filters); import wsi.store; "
            "print(warnings.filters == before)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "True", "importing wsi.store changed the process's warnings filters"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = TileStore.create(tmp_path / "s.zarr")
        st.add_slide("a", np.zeros((3, 2)), tiles=np.full((3, 16, 16, 3), 9, np.uint8), tile_codec="jpeg-90")
        TileStore.open(tmp_path / "s.zarr", readonly=True)["a"].read_tiles([0, 2])
    assert not [w for w in caught if "Numcodecs" in str(w.message)]


def test_invalid_ids_are_simply_not_in_the_store(tmp_path):
    st = TileStore.create(tmp_path / "s.zarr")
    st.add_slide("a", np.zeros((1, 2)))
    assert "a" in st and "b" not in st
    for bad in ("../a", "", "a/b", ".hidden", 3, None):
        assert bad not in st


def test_predictions_keep_their_dtype(tmp_path):
    st = TileStore.create(tmp_path / "s.zarr")
    view = st.add_slide("a", np.zeros((4, 2)))
    big = 2 ** 25 + 1                          # not representable in float32
    view.write_predictions("r", {"predicted": np.array([0, 2, 1, big]), "flag": np.array([1, 0, 0, 1], bool),
                                 "score": np.array([0.1, 0.2, 0.3, 0.4])}, {})
    arrays, _ = TileStore.open(tmp_path / "s.zarr", readonly=True)["a"].predictions("r")
    assert arrays["predicted"].dtype.kind == "i" and arrays["predicted"].tolist() == [0, 2, 1, big]
    assert arrays["flag"].dtype == bool
    assert arrays["score"].dtype == np.float32         # float64 scores are stored as float32


def test_read_tiles_needs_indices_and_iter_tiles_visits_all_in_bounded_chunks(tmp_path):
    n = 4 * TILE_CHUNK + 5
    tiles = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    view = TileStore.create(tmp_path / "s.zarr").add_slide("a", np.zeros((n, 2)), tiles=tiles, tile_codec="lossless")
    with pytest.raises(TypeError):
        view.read_tiles()                      # the whole slide at once is never the default
    seen = list(view.iter_tiles(chunk=10))     # rounded up to whole store chunks: 16
    assert [len(i) for i, _ in seen] == [16, 16, n - 32]
    np.testing.assert_array_equal(np.concatenate([i for i, _ in seen]), np.arange(n))
    np.testing.assert_array_equal(np.concatenate([t for _, t in seen]), tiles)
