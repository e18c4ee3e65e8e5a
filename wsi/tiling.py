"""A tile grid at a physical resolution, and reading its tiles.

The grid lives in level-0 pixels (top-left x, y, the CLAM/TRIDENT convention). A tile of
`patch_size` px at `target_mpp` covers `patch_size * target_mpp / slide_mpp` level-0 px; it is read
at the nearest finer pyramid level and resized to `patch_size`. Tiled JPEG TIFF/SVS levels are read
through `JpegTileReader` (DCT-scaled decoding) whenever the geometry allows; every other case goes
through openslide's `read_region`. Both give the same pixels within JPEG-decoder tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .slide import Slide, SlideError
from .tissue import TissueMask


@dataclass(frozen=True)
class TileGeometry:
    """How a tile maps onto the slide: what every reader and the store attributes need."""

    target_mpp: float
    patch_size: int          # px at target_mpp
    patch_size_level0: int   # px at level 0 (rounded)
    level: int               # pyramid level the pixels are read from
    read_size: int           # px read at that level, then resized to patch_size
    level_downsample: float
    step_level0: float       # grid step at level 0
    overlap: int             # px at target_mpp

    @property
    def resize_needed(self) -> bool:
        return self.read_size != self.patch_size


def tile_geometry(slide: Slide, target_mpp: float = 0.5, patch_size: int = 256, overlap: int = 0) -> TileGeometry:
    """Pick the read level (nearest finer) and sizes for tiles of `patch_size` px at `target_mpp`."""
    if target_mpp <= 0 or patch_size <= 0:
        raise ValueError("target mpp and patch size must be positive")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
    scale0 = target_mpp / slide.mpp
    level = slide.best_level_for_downsample(scale0)
    ds = slide.levels[level].downsample
    return TileGeometry(
        target_mpp=float(target_mpp), patch_size=int(patch_size),
        patch_size_level0=int(round(patch_size * scale0)), level=level,
        read_size=max(1, int(round(patch_size * scale0 / ds))), level_downsample=float(ds),
        step_level0=(patch_size - overlap) * scale0, overlap=int(overlap))


def tissue_fractions(tissue: TissueMask, coords: np.ndarray, size_level0: float) -> np.ndarray:
    """Fraction of each tile (level-0 top-left `coords`, side `size_level0`) covered by tissue."""
    m = tissue.mask
    dx, dy = tissue.downsample
    x0 = np.clip(np.round(coords[:, 0] / dx).astype(np.int64), 0, m.shape[1] - 1)
    y0 = np.clip(np.round(coords[:, 1] / dy).astype(np.int64), 0, m.shape[0] - 1)
    # A tile narrower than a mask pixel still covers one.
    x1 = np.clip(np.maximum(np.round((coords[:, 0] + size_level0) / dx).astype(np.int64), x0 + 1), 1, m.shape[1])
    y1 = np.clip(np.maximum(np.round((coords[:, 1] + size_level0) / dy).astype(np.int64), y0 + 1), 1, m.shape[0])
    return (box_sums(m, x0, y0, x1, y1) / ((x1 - x0) * (y1 - y0))).astype(np.float32)


def box_sums(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Sum of `mask` over each box [y0, y1) x [x0, x1) (indices within the mask), int64.

    One summed-area table answers every box at once: no Python loop per tile.
    """
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(mask, 0, dtype=np.int64, out=sat[1:, 1:]), 1, out=sat[1:, 1:])
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]


def grid_coords(slide: Slide, geom: TileGeometry) -> np.ndarray:
    """All grid positions whose tile lies wholly inside the slide, row-major, (N, 2) int32."""
    W, H = slide.dimensions
    p0 = geom.patch_size_level0
    nx = int(np.floor((W - p0) / geom.step_level0)) + 1 if W >= p0 else 0
    ny = int(np.floor((H - p0) / geom.step_level0)) + 1 if H >= p0 else 0
    xs = np.round(np.arange(nx) * geom.step_level0).astype(np.int64)
    ys = np.round(np.arange(ny) * geom.step_level0).astype(np.int64)
    xs, ys = xs[xs + p0 <= W], ys[ys + p0 <= H]
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int32)


def plan_tiles(slide: Slide, tissue: TissueMask, geom: TileGeometry, min_tissue: float = 0.25
               ) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (N, 2 int32, level 0) of grid tiles with tissue fraction >= `min_tissue`, and those fractions."""
    coords = grid_coords(slide, geom)
    if len(coords) == 0:
        return coords, np.zeros(0, np.float32)
    frac = tissue_fractions(tissue, coords, geom.patch_size_level0)
    keep = frac >= min_tissue
    return coords[keep], frac[keep]


class TileReader:
    """Reads tiles of one slide by their level-0 coordinates, resized to the patch size."""

    def __init__(self, slide: Slide, geom: TileGeometry, fast: bool = True):
        self.slide, self.geom = slide, geom
        self.jpeg = None
        scale = geom.read_size // geom.patch_size
        ds = geom.level_downsample
        if (fast and geom.read_size == scale * geom.patch_size and ds == int(ds)
                and slide.vendor not in ("image",)):
            from .tiffjpeg import SUPPORTED_SCALES, JpegTileReader

            if scale in SUPPORTED_SCALES:
                lv = slide.levels[geom.level]
                self.jpeg = JpegTileReader.for_level(slide.path, lv.width, lv.height)
        self._scale = scale

    @property
    def method(self) -> str:
        return "jpeg-direct" if self.jpeg is not None else "openslide"

    def read(self, x: int, y: int) -> np.ndarray:
        g = self.geom
        if self.jpeg is not None:
            ds = int(g.level_downsample)
            lx, ly = x // ds, y // ds
            if x % ds == 0 and y % ds == 0 and self.jpeg.can_read(lx, ly, self._scale):
                try:
                    return self.jpeg.read(lx, ly, g.read_size, g.read_size, self._scale)
                except OSError as e:
                    raise SlideError(str(e)) from e
        return self.read_openslide(x, y)

    def read_openslide(self, x: int, y: int) -> np.ndarray:
        """The reference path: `read_region` at the read level, then an area (or cubic) resize."""
        import cv2

        g = self.geom
        region = self.slide.read_region((x, y), g.level, (g.read_size, g.read_size))
        if not g.resize_needed:
            return region
        interp = cv2.INTER_AREA if g.read_size > g.patch_size else cv2.INTER_CUBIC
        return cv2.resize(region, (g.patch_size, g.patch_size), interpolation=interp)

    def read_many(self, coords: np.ndarray) -> np.ndarray:
        out = np.empty((len(coords), self.geom.patch_size, self.geom.patch_size, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            out[i] = self.read(int(x), int(y))
        return out

    def close(self) -> None:
        if self.jpeg is not None:
            self.jpeg.close()
