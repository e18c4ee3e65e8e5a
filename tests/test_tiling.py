"""Tiling at a physical resolution: geometry, tissue filtering and pixels."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from wsi.slide import open_slide
from wsi.tiling import TileReader, grid_coords, plan_tiles, tile_geometry, tissue_fractions
from wsi.tissue import TissueMask, segment_tissue


def test_geometry_picks_finer_level_and_sizes(cmu_slide):
    with open_slide(cmu_slide) as s:
        g = tile_geometry(s, 0.5, 256)
        assert g.level == 0 and g.read_size == 257 and g.patch_size_level0 == 257
        g1 = tile_geometry(s, 1.0, 224)
        assert g1.read_size == round(224 * 1.0 / 0.499)
        with pytest.raises(ValueError, match="overlap"):
            tile_geometry(s, 0.5, 256, overlap=256)


def test_cmu_tiles_inside_on_tissue_and_equal_to_read_region(cmu_slide):
    with open_slide(cmu_slide) as s:
        t = segment_tissue(s)
        g = tile_geometry(s, 0.5, 256)
        coords, frac = plan_tiles(s, t, g, min_tissue=0.25)
        W, H = s.dimensions
        assert 20 < len(coords) < 80
        assert coords.dtype == np.int32 and coords.shape[1] == 2
        assert (coords >= 0).all() and (coords[:, 0] + g.patch_size_level0 <= W).all()
        assert (coords[:, 1] + g.patch_size_level0 <= H).all()
        assert (frac >= 0.25).all()
        reader = TileReader(s, g)
        assert reader.method == "openslide"   # 257 px at level 0 is no JPEG scale: the reference path
        for x, y in coords[:: max(1, len(coords) // 5)]:
            tile = reader.read(int(x), int(y))
            ref = cv2.resize(s.read_region((int(x), int(y)), 0, (257, 257)), (256, 256), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(tile, ref)
            # and the tile is tissue, not glass
            assert cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1].mean() > 20


def test_min_tissue_and_overlap(cmu_slide):
    with open_slide(cmu_slide) as s:
        t = segment_tissue(s)
        g = tile_geometry(s, 0.5, 256)
        n_any = len(plan_tiles(s, t, g, min_tissue=1e-6)[0])
        n_full = len(plan_tiles(s, t, g, min_tissue=0.9)[0])
        n_mid = len(plan_tiles(s, t, g, min_tissue=0.25)[0])
        assert n_any > n_mid > n_full > 0
        go = tile_geometry(s, 0.5, 256, overlap=128)
        assert len(grid_coords(s, go)) > 3.5 * len(grid_coords(s, g))


def test_tissue_fractions_against_brute_force():
    rng = np.random.default_rng(1)
    mask = (rng.random((60, 80)) > 0.5).astype(np.uint8)
    tm = TissueMask(mask=mask, downsample=(16.0, 16.0), mpp=8.0, threshold=10)
    coords = np.array([[0, 0], [160, 320], [16 * 70, 16 * 50], [8, 8]], np.int32)
    got = tissue_fractions(tm, coords, 64)
    for (x, y), f in zip(coords, got):
        x0, y0 = round(x / 16), round(y / 16)
        assert f == pytest.approx(mask[y0:y0 + 4, x0:x0 + 4].mean())


def test_direct_jpeg_path_matches_openslide(synth_cohort):
    """0.25 -> 0.5 µm/px on a tiled JPEG slide takes the DCT-scaled path; same pixels within tolerance."""
    from wsi.slide import open_slide

    path = sorted(synth_cohort.glob("*.svs"))[0]
    with open_slide(path) as s:
        g = tile_geometry(s, 0.5, 256)
        assert (g.level, g.read_size, g.patch_size_level0) == (0, 512, 512)
        t = segment_tissue(s)
        coords, _ = plan_tiles(s, t, g)
        reader = TileReader(s, g)
        assert reader.method == "jpeg-direct"
        assert reader.jpeg.tile_w == 256 and (coords % 256 == 0).all()    # grid aligned to the slide's tiles
        diffs = []
        for x, y in coords[:: max(1, len(coords) // 12)]:
            fast = reader.read(int(x), int(y)).astype(int)
            ref = reader.read_openslide(int(x), int(y)).astype(int)
            diffs.append(np.abs(fast - ref))
        d = np.stack(diffs)
        assert d.mean() < 1.0 and np.percentile(d, 99.9) <= 12
        # and the openslide path is exactly read_region + area resize
        x, y = (int(v) for v in coords[0])
        ref = cv2.resize(s.read_region((x, y), 0, (512, 512)), (256, 256), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(reader.read_openslide(x, y), ref)
