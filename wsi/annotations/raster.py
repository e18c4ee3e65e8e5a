"""Regions rasterised to per-tile fractions: how much of each tile lies inside the annotated area.

A tile's fraction is its area inside the union of the included regions, minus their holes, minus
exclusion regions (Camelyon16 group `_2`: non-tumor inside tumor). Fractions come from a
rasterisation at >= 16 px per tile side: a pixel counts when its centre is inside (the usual
scan-line rule, so a square covering half a tile gives exactly 0.5), and one summed-area table
answers every tile at once. Only the bounding box where tiles and regions meet is rasterised, a
strip of rows at a time, so memory stays bounded on any slide.
"""
from __future__ import annotations

import math

import numpy as np

from ..tiling import box_sums
from .parse import Region

PX_PER_TILE = 16                 # raster pixels along a tile side, at least
MAX_CANVAS_PX = 256_000_000      # beyond this the raster gets coarser (fewer px per tile)
STRIP_PX = 4_000_000             # raster pixels held at once


def tile_fractions(regions: list[Region], coords: np.ndarray, tile_size_level0: float) -> np.ndarray:
    """(N,) float32 fraction of each tile (level-0 top-left `coords`, side `tile_size_level0`) inside
    the union of the non-exclusion `regions` minus their holes and minus every exclusion region."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if not tile_size_level0 > 0:
        raise ValueError(f"tile size must be positive, got {tile_size_level0}")
    out = np.zeros(len(coords), np.float32)
    incl = [r for r in regions if not r.exclude]
    if not len(coords) or not incl:
        return out
    excl = [r for r in regions if r.exclude]
    size = float(tile_size_level0)
    ox, oy = coords.min(0)                  # the raster grid is aligned with the tile grid
    tx1, ty1 = coords.max(0) + size
    pts = np.concatenate([r.exterior for r in incl])
    rx0, ry0 = pts.min(0)
    rx1, ry1 = pts.max(0)
    ds = size / PX_PER_TILE
    while True:
        c_lo, r_lo = max(0, math.floor((rx0 - ox) / ds)), max(0, math.floor((ry0 - oy) / ds))
        c_hi = min(math.ceil((tx1 - ox) / ds), math.ceil((rx1 - ox) / ds))
        r_hi = min(math.ceil((ty1 - oy) / ds), math.ceil((ry1 - oy) / ds))
        W, H = c_hi - c_lo, r_hi - r_lo
        if W <= 0 or H <= 0:
            return out                      # no tile meets a region
        if W * H <= MAX_CANVAS_PX:
            break
        ds *= math.sqrt(W * H / MAX_CANVAS_PX) * 1.01

    def to_px(ring: np.ndarray) -> np.ndarray:
        return np.stack([(ring[:, 0] - ox) / ds - c_lo, (ring[:, 1] - oy) / ds - r_lo], 1)

    spans_in = _spans([[to_px(r.exterior), *map(to_px, r.holes)] for r in incl], W, H)
    spans_ex = _spans([[to_px(r.exterior), *map(to_px, r.holes)] for r in excl], W, H)
    # Tile boxes in raster px; the full tile area is the denominator even where the raster is clipped.
    c0 = np.round((coords[:, 0] - ox) / ds).astype(np.int64) - c_lo
    r0 = np.round((coords[:, 1] - oy) / ds).astype(np.int64) - r_lo
    c1 = np.maximum(np.round((coords[:, 0] + size - ox) / ds).astype(np.int64) - c_lo, c0 + 1)
    r1 = np.maximum(np.round((coords[:, 1] + size - oy) / ds).astype(np.int64) - r_lo, r0 + 1)
    area = (c1 - c0) * (r1 - r0)
    inside = np.zeros(len(coords), np.int64)
    cc0, cc1 = np.clip(c0, 0, W), np.clip(c1, 0, W)
    step = max(1, STRIP_PX // W)
    for s0 in range(0, H, step):
        s1 = min(H, s0 + step)
        mask = _paint(spans_in, s0, s1, W) > 0
        if spans_ex[0].size:
            mask &= _paint(spans_ex, s0, s1, W) == 0
        inside += box_sums(mask, cc0, np.clip(r0 - s0, 0, s1 - s0), cc1, np.clip(r1 - s0, 0, s1 - s0))
    np.divide(inside, area, out=out, casting="unsafe")
    return out


def _spans(polygons: list[list[np.ndarray]], W: int, H: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-line spans (row, first col, end col) of each polygon (rings in raster px, even-odd within
    a polygon), sorted by row. A pixel (i, j) is inside when its centre (j + .5, i + .5) is."""
    rows_all, c0_all, c1_all = [], [], []
    for rings in polygons:
        x0 = np.concatenate([r[:, 0] for r in rings])
        y0 = np.concatenate([r[:, 1] for r in rings])
        x1 = np.concatenate([np.roll(r[:, 0], -1) for r in rings])   # each ring closes on itself
        y1 = np.concatenate([np.roll(r[:, 1], -1) for r in rings])
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows whose centre lies in [lo, hi): half-open, so a vertex is crossed once, and every
        # row crosses a closed ring an even number of times.
        first = np.clip(np.ceil(lo - 0.5), 0, H).astype(np.int64)
        end = np.clip(np.ceil(hi - 0.5), 0, H).astype(np.int64)
        n = end - first
        keep = n > 0
        if not keep.any():
            continue
        x0, y0, x1, y1, first, n = x0[keep], y0[keep], x1[keep], y1[keep], first[keep], n[keep]
        e = np.repeat(np.arange(len(n)), n)
        rows = first[e] + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
        x = x0[e] + (rows + 0.5 - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
        order = np.lexsort((x, rows))
        rows, x = rows[order], x[order]
        c0 = np.clip(np.ceil(x[0::2] - 0.5), 0, W).astype(np.int64)
        c1 = np.clip(np.ceil(x[1::2] - 0.5), 0, W).astype(np.int64)
        ok = c1 > c0
        rows_all.append(rows[0::2][ok])
        c0_all.append(c0[ok])
        c1_all.append(c1[ok])
    if not rows_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, c0, c1 = np.concatenate(rows_all), np.concatenate(c0_all), np.concatenate(c1_all)
    order = np.argsort(rows, kind="stable")
    return rows[order], c0[order], c1[order]


def _paint(spans: tuple[np.ndarray, np.ndarray, np.ndarray], s0: int, s1: int, W: int) -> np.ndarray:
    """How many polygons cover each pixel of rows [s0, s1): (s1 - s0, W) int32."""
    rows, c0, c1 = spans
    a, b = np.searchsorted(rows, [s0, s1])
    diff = np.zeros((s1 - s0, W + 1), np.int32)
    np.add.at(diff, (rows[a:b] - s0, c0[a:b]), 1)
    np.add.at(diff, (rows[a:b] - s0, c1[a:b]), -1)
    return np.cumsum(diff[:, :W], axis=1, out=diff[:, :W])
