"""Synthetic whole-slide cohorts with ground truth, for demos, tests and benchmarks.

Each slide is a pyramidal, Aperio-like TIFF (opens in OpenSlide as vendor
``aperio``) whose tissue is made of real H&E texture crops shipped in
``wsi/data``: normal skin everywhere in the tissue, carcinoma inside the tumor
regions of positive slides. Tumor regions are written as QuPath-style GeoJSON
polygons in level-0 pixel coordinates.

The layout (tissue and tumor masks) lives on a coarse grid (~32 µm/px); every
pyramid level samples the same masks and the same physically-scaled texture
placement, so level k looks like a downsample of level 0. Nothing larger than a
tile is ever held per level, which is what lets 100k-pixel slides be written in
constant memory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterator

import imagecodecs
import numpy as np
import tifffile
from PIL import Image
from skimage import filters, measure, morphology, transform
from tqdm.auto import tqdm

__all__ = ["SynthSlide", "write_slide", "make_cohort"]

logger = logging.getLogger(__name__)

# (file, native µm/px); µm/px values come from wsi/data/README.md
_NORMAL_TEXTURES = (("normal_0.jpg", 0.499), ("normal_1.jpg", 0.499), ("normal_2.jpg", 0.499))
_TUMOR_TEXTURE = ("tumor_0.jpg", 0.4)

_LAYOUT_UM = 32.0  # µm per layout pixel, at most
_LAYOUT_MIN_PX = 256  # long side of the layout grid, at least (small slides)
_CELL_UM = 1024.0  # mean size of a texture-placement region (Voronoi cell)
_EDGE_SHARPNESS = 8.0  # slope of alpha vs. mask value around the 0.5 contour
_LOWEST_LEVEL_PX = 2048
_LEVEL_FACTOR = 4
_THUMBNAIL_PX = 1024
_BIGTIFF_ABOVE = 3.5e9  # bytes; classic TIFF offsets overflow at 4 GiB
_APERIO_HEADER = "Aperio Image Library v12.0.0 \n"

# Alpha is exactly 0 below _LO and exactly 1 above _HI; tiles whose mask
# footprint stays on one side skip blending entirely.
_LO = 0.5 - 0.5 / _EDGE_SHARPNESS
_HI = 0.5 + 0.5 / _EDGE_SHARPNESS


@dataclass
class SynthSlide:
    """One slide of a synthetic cohort."""

    slide_id: str
    path: Path
    label: str  # "tumor" or "normal"
    width: int
    height: int
    mpp: float
    annotation_path: Path | None  # GeoJSON, only for tumor slides


# --------------------------------------------------------------------------- #
# Layout: tissue / tumor masks on a coarse grid, plus texture placement regions
# --------------------------------------------------------------------------- #


@dataclass
class _Layout:
    ds: int  # level-0 px per layout px
    tissue: np.ndarray  # float32 (gh, gw); tissue where > 0.5
    tumor: np.ndarray | None  # float32 (gh, gw); tumor where > 0.5
    polygons: list[np.ndarray]  # level-0 (x, y), closed rings
    cell: float  # Voronoi grid pitch, level-0 px
    seeds: np.ndarray  # float64 (gy, gx, 2) Voronoi seeds, level-0 (y, x)
    normal_tex: np.ndarray  # int (gy, gx) which normal texture per region
    normal_dih: np.ndarray  # int (gy, gx) dihedral transform 0..7
    normal_off: np.ndarray  # float (gy, gx, 2) texture offset in µm
    tumor_dih: np.ndarray
    tumor_off: np.ndarray


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], n_ctrl: int = 6) -> np.ndarray:
    """Unit-variance low-frequency noise: bicubic upsampling of a coarse random grid."""
    coarse = rng.standard_normal((n_ctrl, n_ctrl))
    field = transform.resize(coarse, shape, order=3, mode="reflect", anti_aliasing=False)
    return ((field - field.mean()) / (field.std() + 1e-9)).astype(np.float32)


def _ellipse_radius(shape, cy, cx, a, b, theta) -> np.ndarray:
    """Normalised elliptical radius (1 on the ellipse) over a grid."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(theta), math.sin(theta)
    u = (c * dx + s * dy) / a
    v = (-s * dx + c * dy) / b
    return np.sqrt(u * u + v * v)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Binary tissue mask: 1–4 noise-deformed ellipses covering ~30–60% of the slide."""
    gh, gw = shape
    r_ref = math.sqrt(gh * gw)
    n_blobs = int(rng.integers(1, 5))
    target = float(rng.uniform(0.32, 0.55))
    blobs = []
    for _ in range(n_blobs):
        cy = rng.uniform(0.3, 0.7) * gh
        cx = rng.uniform(0.25, 0.75) * gw
        size = rng.uniform(0.6, 1.0)
        aspect = rng.uniform(1.0, 1.8)
        theta = rng.uniform(0, math.pi)
        # Radius computed once at unit scale; scaling the ellipse = dividing r.
        r_unit = _ellipse_radius(shape, cy, cx, size * r_ref * math.sqrt(aspect), size * r_ref / math.sqrt(aspect), theta)
        blobs.append((r_unit, 0.25 * _smooth_noise(rng, shape)))

    margin_y, margin_x = max(1, int(0.03 * gh)), max(1, int(0.03 * gw))
    inner = np.zeros(shape, bool)
    inner[margin_y : gh - margin_y, margin_x : gw - margin_x] = True

    def mask_at(scale: float) -> np.ndarray:
        m = np.zeros(shape, bool)
        for r_unit, noise in blobs:
            m |= (1.0 - r_unit / scale + noise) > 0
        return m & inner

    # Coverage grows monotonically with scale, so bisect to hit the target.
    lo, hi = 0.01, 2.0
    for _ in range(25):
        mid = 0.5 * (lo + hi)
        if mask_at(mid).mean() < target:
            lo = mid
        else:
            hi = mid
    mask = mask_at(hi)
    area = int(mask.sum())
    mask = morphology.remove_small_objects(mask, max_size=max(1, int(0.01 * area)))
    mask = morphology.remove_small_holes(mask, max_size=max(1, int(0.005 * area)))
    return mask


def _tumor_masks(rng: np.random.Generator, tissue: np.ndarray, n_tumor: int, min_px: float) -> list[np.ndarray]:
    """Binary tumor blobs strictly inside eroded tissue, each ~4–12% of tissue area, not touching."""
    gh, gw = tissue.shape
    r_ref = math.sqrt(gh * gw)
    tissue_area = float(tissue.sum())
    # Erosion keeps annotations (and the soft edges around them) inside tissue.
    eroded = morphology.isotropic_erosion(tissue, max(3.0, 0.02 * r_ref))
    forbidden = np.zeros_like(tissue)
    blobs: list[np.ndarray] = []
    for j in range(n_tumor):
        noise = 0.2 * _smooth_noise(rng, tissue.shape, n_ctrl=12)
        best: np.ndarray | None = None
        for _attempt in range(60):
            allowed = eroded & ~forbidden
            candidates = np.flatnonzero(allowed)
            if candidates.size == 0:
                break
            frac = rng.uniform(0.04, 0.12)
            area = max(frac * tissue_area, min_px)
            aspect = rng.uniform(1.0, 1.8)
            radius = math.sqrt(area / math.pi)
            cy, cx = np.unravel_index(candidates[rng.integers(candidates.size)], tissue.shape)
            r = _ellipse_radius(tissue.shape, cy, cx, radius * math.sqrt(aspect), radius / math.sqrt(aspect), rng.uniform(0, math.pi))
            blob = ((1.0 - r + noise) > 0) & allowed
            labels = measure.label(blob)
            if labels.max() == 0:
                continue
            # A clipped ellipse can fall apart; one region = one connected blob.
            largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
            blob = labels == largest
            if best is None or blob.sum() > best.sum():
                best = blob
            if blob.sum() >= max(0.5 * area, 0.03 * tissue_area):
                break
        if best is None or not best.any():
            logger.warning("could place only %d of %d tumor regions", j, n_tumor)
            break
        if best.sum() < 0.03 * tissue_area:
            logger.warning("tumor region %d covers only %.1f%% of tissue", j, 100 * best.sum() / tissue_area)
        blobs.append(best)
        # Gap wide enough that the smoothed fields of two blobs never merge.
        forbidden |= morphology.isotropic_dilation(best, 6.0)
    return blobs


def _polygon(field: np.ndarray, ds: int) -> np.ndarray:
    """Closed level-0 (x, y) ring of the 0.5 contour of one blob's soft field."""
    contours = measure.find_contours(np.pad(field, 1), 0.5)
    ring = max(contours, key=len) - 1.0  # undo the pad
    ring = measure.approximate_polygon(ring, tolerance=0.5)
    # Layout pixel i is centred on level-0 coordinate (i + 0.5) * ds.
    xy = (ring[:, ::-1] + 0.5) * ds
    return np.round(xy, 2)


def _make_layout(rng: np.random.Generator, width: int, height: int, mpp: float, n_tumor: int) -> _Layout:
    ds = max(1, min(round(_LAYOUT_UM / mpp), max(width, height) // _LAYOUT_MIN_PX))
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    sigma = 1.5  # layout px; smooths the binary staircase into a soft edge
    tissue_bin = _tissue_mask(rng, shape)
    tissue = filters.gaussian(tissue_bin.astype(np.float32), sigma=sigma, preserve_range=True).astype(np.float32)

    tumor = None
    polygons: list[np.ndarray] = []
    if n_tumor > 0:
        # "At least several 128 µm tiles", where the slide is large enough for that.
        min_px = 4 * (128.0 / (ds * mpp)) ** 2
        min_px = min(min_px, 0.08 * tissue_bin.sum())
        blobs = _tumor_masks(rng, tissue_bin & (tissue > _HI), n_tumor, min_px)
        fields = [filters.gaussian(b.astype(np.float32), sigma=1.0, preserve_range=True).astype(np.float32) for b in blobs]
        polygons = [_polygon(f, ds) for f in fields]
        tumor = np.maximum.reduce(fields) if fields else None

    # Texture placement varies per Voronoi region of a jittered grid, so
    # neither the periodic crop nor a square grid of seams is obvious.
    cell = _CELL_UM / mpp
    gy, gx = math.ceil(height / cell), math.ceil(width / cell)
    jitter = rng.uniform(-0.4, 0.4, size=(gy, gx, 2))
    grid = np.stack(np.mgrid[0:gy, 0:gx], axis=-1).astype(np.float64)
    seeds = (grid + 0.5 + jitter) * cell
    return _Layout(
        ds=ds,
        tissue=tissue,
        tumor=tumor,
        polygons=polygons,
        cell=cell,
        seeds=seeds,
        normal_tex=rng.integers(0, len(_NORMAL_TEXTURES), size=(gy, gx)),
        normal_dih=rng.integers(0, 8, size=(gy, gx)),
        normal_off=rng.uniform(0, 8192, size=(gy, gx, 2)),
        tumor_dih=rng.integers(0, 8, size=(gy, gx)),
        tumor_off=rng.uniform(0, 8192, size=(gy, gx, 2)),
    )


# --------------------------------------------------------------------------- #
# Textures
# --------------------------------------------------------------------------- #


def _load_texture(name: str) -> np.ndarray:
    with (files("wsi") / "data" / name).open("rb") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


def _stain_lut(rng: np.random.Generator) -> np.ndarray:
    """Per-channel 256-entry LUT scaling optical density by a few percent (per-slide stain jitter)."""
    scale = rng.uniform(0.9, 1.1) * rng.normal(1.0, 0.03, size=3)
    levels = np.arange(256, dtype=np.float64)
    od = -np.log((levels + 1.0) / 256.0)
    out = 256.0 * np.exp(-od[None, :] * scale[:, None]) - 1.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)  # (3, 256)


# rot90 k times, then optionally flip left-right; _DIH_MAT is the linear part
# of the index map out[i, j] = in[L @ (i, j) + c], used to find which window of
# the periodic base texture a transformed window comes from.
_ROT = np.array([[0, 1], [-1, 0]])
_FLIP = np.array([[1, 0], [0, -1]])
_DIH_MAT = [
    tuple(map(tuple, np.linalg.matrix_power(_ROT, k) @ (_FLIP if flip else np.eye(2, dtype=int))))
    for k in range(4)
    for flip in (False, True)
]


def _apply_dihedral(a: np.ndarray, dih: int) -> np.ndarray:
    a = np.rot90(a, dih // 2)
    return a[:, ::-1] if dih % 2 else a


@dataclass
class _Texture:
    """A seamless periodic texture at one level's resolution, padded so any tile-sized window is a plain slice."""

    ext: np.ndarray  # (ph + pad, pw + pad, 3)
    ph: int
    pw: int
    pad: int

    @classmethod
    def build(cls, img: np.ndarray, native_mpp: float, level_mpp: float, lut: np.ndarray, pad: int) -> _Texture:
        scale = native_mpp / level_mpp
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        res = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
        res = np.stack([lut[c][res[..., c]] for c in range(3)], axis=-1)
        # Mirroring makes the crop seamless when tiled periodically.
        top = np.concatenate([res, res[:, ::-1]], axis=1)
        period = np.concatenate([top, top[::-1]], axis=0)
        ph, pw = period.shape[:2]
        reps = (math.ceil((ph + pad) / ph), math.ceil((pw + pad) / pw), 1)
        ext = np.ascontiguousarray(np.tile(period, reps)[: ph + pad, : pw + pad])
        return cls(ext, ph, pw, pad)

    def window(self, dih: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Rows y0..y0+h, cols x0..x0+w of the periodic tiling of dihedral-transformed texture."""
        (a, b), (c, d) = _DIH_MAT[dih]
        ys = (a * y0 + b * x0, a * (y0 + h - 1) + b * x0, a * y0 + b * (x0 + w - 1), a * (y0 + h - 1) + b * (x0 + w - 1))
        xs = (c * y0 + d * x0, c * (y0 + h - 1) + d * x0, c * y0 + d * (x0 + w - 1), c * (y0 + h - 1) + d * (x0 + w - 1))
        ry, rx = min(ys), min(xs)
        bh, bw = max(ys) - ry + 1, max(xs) - rx + 1
        sy, sx = ry % self.ph, rx % self.pw
        if sy + bh <= self.ph + self.pad and sx + bw <= self.pw + self.pad:
            win = self.ext[sy : sy + bh, sx : sx + bw]
        else:  # windows larger than the padding (thumbnail-sized renders)
            rows = np.arange(sy, sy + bh) % self.ph
            cols = np.arange(sx, sx + bw) % self.pw
            win = self.ext[rows][:, cols]
        return _apply_dihedral(win, dih)


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    # Photometric RGB means OpenSlide decodes the JPEG as RGB (no YCbCr
    # transform), like real Aperio files; encode to match, else colours shift.
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))


def _axis_weights(n: int, start: int, d: float, ds: int, n_lr: int) -> tuple[int, np.ndarray]:
    """Bilinear interpolation matrix from layout samples to level pixels start..start+n along one axis."""
    u = ((np.arange(start, start + n) + 0.5) * d) / ds - 0.5
    u = np.clip(u, 0.0, n_lr - 1.0)
    i0 = np.minimum(np.floor(u).astype(np.int64), max(n_lr - 2, 0))
    f = (u - i0).astype(np.float32)
    first = int(i0.min())
    k = min(int(i0.max()) + 2, n_lr) - first
    weights = np.zeros((n, k), np.float32)
    rows = np.arange(n)
    weights[rows, i0 - first] += 1.0 - f
    if k > 1:
        weights[rows, np.minimum(i0 - first + 1, k - 1)] += f
    return first, weights


class _Renderer:
    """Composes tiles of one pyramid level from the slide layout and level-resampled textures."""

    def __init__(self, layout: _Layout, d: float, mpp: float, tile: int, textures: dict, lut: np.ndarray, background: np.ndarray):
        self.layout = layout
        self.d = d
        self.mpp = mpp * d  # µm per pixel of this level
        self.tile = tile
        self.background = background
        self.background_f = background.astype(np.float32)
        self.normal = [_Texture.build(textures[name], nat, self.mpp, lut, tile) for name, nat in _NORMAL_TEXTURES]
        name, nat = _TUMOR_TEXTURE
        self.tumor = _Texture.build(textures[name], nat, self.mpp, lut, tile) if layout.tumor is not None else None

    # -- texture placement -------------------------------------------------- #

    def _regions(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Voronoi region ids covering a level rectangle: (ids,) if one region, else (ids, per-pixel labels)."""
        lay = self.layout
        gy, gx = lay.seeds.shape[:2]
        d = self.d
        ya, yb = (y0 + 0.5) * d, (y0 + h - 0.5) * d
        xa, xb = (x0 + 0.5) * d, (x0 + w - 0.5) * d
        # A jittered (±0.4 cell) grid seed is never nearest beyond 2 cells away.
        i0, i1 = max(0, int(ya // lay.cell) - 2), min(gy, int(yb // lay.cell) + 3)
        j0, j1 = max(0, int(xa // lay.cell) - 2), min(gx, int(xb // lay.cell) + 3)
        seeds = lay.seeds[i0:i1, j0:j1].reshape(-1, 2)
        ids = (np.arange(i0, i1)[:, None] * gx + np.arange(j0, j1)[None, :]).ravel()
        corners = np.array([[ya, xa], [ya, xb], [yb, xa], [yb, xb]])
        d2 = ((corners[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)
        nearest = d2.argmin(1)
        if (nearest == nearest[0]).all():  # Voronoi cells are convex
            return ids[nearest[:1]], None
        center = np.array([(ya + yb) / 2, (xa + xb) / 2])
        dist = np.sqrt(((seeds - center) ** 2).sum(-1))
        half_diag = 0.5 * math.hypot(yb - ya, xb - xa)
        keep = np.flatnonzero(dist <= dist.min() + 2 * half_diag)
        py = ((np.arange(y0, y0 + h) + 0.5) * d)[:, None]
        px = ((np.arange(x0, x0 + w) + 0.5) * d)[None, :]
        best = np.full((h, w), np.inf)
        labels = np.zeros((h, w), np.int64)
        for idx in keep:
            dd = (py - seeds[idx, 0]) ** 2 + (px - seeds[idx, 1]) ** 2
            closer = dd < best
            best[closer] = dd[closer]
            labels[closer] = ids[idx]
        uniq = np.unique(labels)
        return uniq, labels

    def _layer(self, kind: str, regions, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        lay = self.layout
        ids, labels = regions

        def one(rid: int) -> np.ndarray:
            iy, ix = divmod(int(rid), lay.seeds.shape[1])
            if kind == "normal":
                tex, dih, off = self.normal[lay.normal_tex[iy, ix]], lay.normal_dih[iy, ix], lay.normal_off[iy, ix]
            else:
                tex, dih, off = self.tumor, lay.tumor_dih[iy, ix], lay.tumor_off[iy, ix]
            oy, ox = int(off[0] / self.mpp), int(off[1] / self.mpp)
            return tex.window(int(dih), y0 + oy, x0 + ox, h, w)

        if labels is None:
            return one(ids[0])
        out = np.empty((h, w, 3), np.uint8)
        for rid in ids:
            mask = labels == rid
            out[mask] = one(rid)[mask]
        return out

    # -- masks -------------------------------------------------------------- #

    def _alpha(self, field: np.ndarray, wy: tuple[int, np.ndarray], wx: tuple[int, np.ndarray]) -> np.ndarray:
        (fy, my), (fx, mx) = wy, wx
        sub = field[fy : fy + my.shape[1], fx : fx + mx.shape[1]]
        m = my @ sub @ mx.T
        return np.clip((m - 0.5) * _EDGE_SHARPNESS + 0.5, 0.0, 1.0)[..., None]

    def render(self, y0: int, x0: int, h: int, w: int, wy=None, wx=None) -> np.ndarray | None:
        """RGB pixels of a level rectangle, or None when it is pure background."""
        lay = self.layout
        n_lr_y, n_lr_x = lay.tissue.shape
        wy = wy or _axis_weights(h, y0, self.d, lay.ds, n_lr_y)
        wx = wx or _axis_weights(w, x0, self.d, lay.ds, n_lr_x)
        sl = np.s_[wy[0] : wy[0] + wy[1].shape[1], wx[0] : wx[0] + wx[1].shape[1]]
        # Bilinear values are convex combinations of the footprint samples, so
        # the footprint's min/max bound the whole rectangle.
        foot = lay.tissue[sl]
        if foot.max() <= _LO:
            return None
        regions = self._regions(y0, x0, h, w)
        pix = self._layer("normal", regions, y0, x0, h, w)
        has_tumor = lay.tumor is not None and lay.tumor[sl].max() > _LO
        partial = foot.min() < _HI
        if not has_tumor and not partial:
            return pix  # hot path: interior normal tissue, no blending
        img = pix.astype(np.float32)
        if has_tumor:
            tum = self._layer("tumor", regions, y0, x0, h, w).astype(np.float32)
            img += self._alpha(lay.tumor, wy, wx) * (tum - img)
        if partial:
            bg = self.background_f[:h, :w]
            img = bg + self._alpha(lay.tissue, wy, wx) * (img - bg)
        return (img + 0.5).astype(np.uint8)

    def tiles(self, height: int, width: int, quality: int, white: bytes, pbar) -> Iterator[bytes]:
        """Encoded tiles of a (height, width) level in TIFF order (row-major)."""
        ts = self.tile
        n_lr_y, n_lr_x = self.layout.tissue.shape
        ny, nx = math.ceil(height / ts), math.ceil(width / ts)
        col_w = [_axis_weights(ts, tx * ts, self.d, self.layout.ds, n_lr_x) for tx in range(nx)]
        for ty in range(ny):
            row_w = _axis_weights(ts, ty * ts, self.d, self.layout.ds, n_lr_y)
            for tx in range(nx):
                pix = self.render(ty * ts, tx * ts, ts, ts, row_w, col_w[tx])
                yield white if pix is None else _jpeg(np.ascontiguousarray(pix), quality)
            pbar.update(nx)

    def image(self, height: int, width: int) -> np.ndarray:
        """Whole level in memory (thumbnail-sized levels only)."""
        ts = self.tile
        out = np.empty((math.ceil(height / ts) * ts, math.ceil(width / ts) * ts, 3), np.uint8)
        for y in range(0, height, ts):
            for x in range(0, width, ts):
                pix = self.render(y, x, ts, ts)
                out[y : y + ts, x : x + ts] = self.background if pix is None else pix
        return out[:height, :width]


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def _level_sizes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per pyramid level, 4× apart, until the long side is <= 2048."""
    levels = [(1, width, height)]
    while max(levels[-1][1], levels[-1][2]) > _LOWEST_LEVEL_PX:
        d = levels[-1][0] * _LEVEL_FACTOR
        levels.append((d, max(1, width // d), max(1, height // d)))
    return levels


def _estimate_bytes(layout: _Layout, levels, tile: int, tile_bytes: int, white_bytes: int) -> float:
    # Level 0 dominates; count tiles near tissue there, assume all-tissue above.
    reach = tile / layout.ds + 1.5
    near = morphology.isotropic_dilation(layout.tissue > _LO, reach).mean()
    total = 0.0
    for i, (_, w, h) in enumerate(levels):
        n = math.ceil(w / tile) * math.ceil(h / tile)
        frac = near if i == 0 else 1.0
        total += n * (frac * tile_bytes + (1 - frac) * white_bytes)
    return total


def write_slide(
    path: str | Path,
    *,
    width: int = 16384,
    height: int = 12288,
    mpp: float = 0.25,
    tile_size: int = 256,
    n_tumor: int = 0,
    seed: int = 0,
    quality: int = 80,
    progress: bool = True,
) -> list[np.ndarray]:
    """Write one pyramidal Aperio-like TIFF; return tumor polygons (level-0 x,y float arrays, Kx2).

    Pages: level 0 (tiled JPEG), a stripped thumbnail (as in real SVS files, so
    tifffile's SVS reader also sees the pyramid), then levels downsampled 4× each
    until the long side is <= 2048 px. Polygons are closed rings (first vertex
    repeated last), one per tumor region; empty when ``n_tumor`` is 0.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if tile_size % 16:
        raise ValueError("tile_size must be a multiple of 16")
    rng = np.random.default_rng(seed)
    layout = _make_layout(rng, width, height, mpp, n_tumor)
    lut = _stain_lut(rng)
    bg_colour = 240.0 + rng.uniform(-3, 3) + rng.uniform(-1.5, 1.5, size=3)
    background = np.clip(np.round(bg_colour + rng.normal(0, 1.0, size=(tile_size, tile_size, 3))), 0, 255).astype(np.uint8)
    white = _jpeg(background, quality)  # shared by every background tile of every level
    textures = {name: _load_texture(name) for name, _ in (*_NORMAL_TEXTURES, _TUMOR_TEXTURE)}

    levels = _level_sizes(width, height)
    mag = 40 if mpp < 0.375 else 20
    meta = f"|AppMag = {mag}|MPP = {mpp}"
    common = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": quality, "outcolorspace": "RGB"},
        subsampling=(1, 1),
        metadata=None,
        resolutionunit="CENTIMETER",
    )

    level0 = _Renderer(layout, 1.0, mpp, tile_size, textures, lut, background)
    sample = max(len(_jpeg(np.ascontiguousarray(t.window(0, 0, 0, tile_size, tile_size)), quality)) for t in level0.normal + [level0.tumor] if t is not None)
    estimate = _estimate_bytes(layout, levels, tile_size, int(1.3 * sample), len(white))
    bigtiff = estimate > _BIGTIFF_ABOVE
    n_tiles = sum(math.ceil(w / tile_size) * math.ceil(h / tile_size) for _, w, h in levels)
    logger.debug("%s: %d levels, %d tiles, ~%.0f MB, bigtiff=%s", path.name, len(levels), n_tiles, estimate / 1e6, bigtiff)

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw, tqdm(total=n_tiles, unit="tile", desc=path.name, disable=not progress, leave=False) as pbar:
        renderer = level0
        for i, (d, w, h) in enumerate(levels):
            if i == 0:
                desc = f"{_APERIO_HEADER}{width}x{height} ({tile_size}x{tile_size}) JPEG/RGB Q={quality}{meta}"
            else:
                renderer = _Renderer(layout, float(d), mpp, tile_size, textures, lut, background)
                desc = f"{_APERIO_HEADER}{width}x{height} -> {w}x{h} - ({tile_size}x{tile_size}) JPEG/RGB Q={quality}{meta}"
            # The tile iterator yields pre-encoded JPEG bytes; tifffile only
            # writes them and derives the tags from compression/photometric.
            tw.write(
                renderer.tiles(h, w, quality, white, pbar),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                description=desc,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                **common,
            )
            if i == 0:
                d_thumb = max(width, height) / _THUMBNAIL_PX
                tw_, th_ = max(1, round(width / d_thumb)), max(1, round(height / d_thumb))
                thumb = _Renderer(layout, d_thumb, mpp, tile_size, textures, lut, background).image(th_, tw_)
                tw.write(
                    thumb,
                    description=f"{_APERIO_HEADER}{width}x{height} -> {tw_}x{th_} - {meta}",
                    rowsperstrip=16,
                    **common,
                )
            del renderer

    logger.info(
        "wrote %s: %dx%d, %d levels, %d tumor regions, %.1f MB in %.1f s",
        path, width, height, len(levels), len(layout.polygons), path.stat().st_size / 1e6, time.perf_counter() - t0,
    )
    return layout.polygons


def _geojson(polygons: list[np.ndarray]) -> dict:
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [poly.tolist()]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}},
        }
        for poly in polygons
    ]
    return {"type": "FeatureCollection", "features": features}


def _write_one(job: dict) -> list[np.ndarray]:
    return write_slide(**job)


def make_cohort(
    out: str | Path,
    *,
    n_slides: int = 8,
    seed: int = 0,
    width: int = 16384,
    height: int = 12288,
    mpp: float = 0.25,
    tile_size: int = 256,
    positive_fraction: float = 0.5,
    workers: int = 1,
    progress: bool = True,
) -> list[SynthSlide]:
    """Write OUT/<slide_id>.svs, OUT/labels.csv (header `slide_id,label`), OUT/annotations/<slide_id>.geojson.

    Exactly ``round(n_slides * positive_fraction)`` slides are "tumor" (at least
    one of each class when n_slides >= 2), each with 1–3 annotated tumor
    regions. Everything is a deterministic function of ``seed``, whatever
    ``workers`` is.
    """
    out = Path(out)
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = round(n_slides * positive_fraction)
    if n_slides >= 2:
        n_pos = min(max(n_pos, 1), n_slides - 1)
    positives = set(rng.permutation(n_slides)[:n_pos].tolist())

    jobs = []
    for i in range(n_slides):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        n_tumor = int(rng.integers(1, 4)) if i in positives else 0
        jobs.append(
            dict(
                path=out / f"synth_{i:03d}.svs",
                width=width,
                height=height,
                mpp=mpp,
                tile_size=tile_size,
                n_tumor=n_tumor,
                seed=slide_seed,
                progress=progress and workers <= 1,
            )
        )

    bar = dict(total=n_slides, unit="slide", desc="cohort", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(_write_one, jobs), **bar))
    else:
        results = [_write_one(job) for job in tqdm(jobs, **bar)]

    slides = []
    for i, (job, polygons) in enumerate(zip(jobs, results)):
        slide_id = f"synth_{i:03d}"
        ann = ann_dir / f"{slide_id}.geojson"
        if job["n_tumor"]:
            ann.write_text(json.dumps(_geojson(polygons)))
        else:
            ann.unlink(missing_ok=True)  # stale file from an earlier cohort in the same folder
        slides.append(
            SynthSlide(
                slide_id=slide_id,
                path=job["path"],
                label="tumor" if job["n_tumor"] else "normal",
                width=width,
                height=height,
                mpp=mpp,
                annotation_path=ann if job["n_tumor"] else None,
            )
        )
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label"])
        writer.writerows((s.slide_id, s.label) for s in slides)
    logger.info("cohort of %d slides (%d tumor) in %s", n_slides, len(positives), out)
    return slides
