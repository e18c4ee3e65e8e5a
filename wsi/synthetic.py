"""Synthetic whole-slide cohorts with ground truth, for demos, tests and benchmarks.

Each slide is a pyramidal, Aperio-like TIFF (opens in OpenSlide as vendor
``aperio``) whose tissue is made of real H&E texture crops shipped in
``wsi/data``: normal skin everywhere in the tissue, carcinoma inside the tumor
regions of positive slides. Tumor regions are written as QuPath-style GeoJSON
polygons in level-0 pixel coordinates.

The layout (tissue and tumor masks) lives on a coarse grid (~32 µm/px); every
pyramid level samples the same masks and the same physically-scaled texture
placement, so level k looks like a downsample of level 0. Tiles are generated
and encoded one at a time and background tiles share one pre-encoded JPEG, so no
level is ever held in memory and 100k-pixel slides take minutes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
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
_ALL_TEXTURES = (*_NORMAL_TEXTURES, _TUMOR_TEXTURE)

_LAYOUT_UM = 32.0  # µm per layout pixel, at most
_LAYOUT_MIN_PX = 256  # long side of the layout grid, at least (small slides)
_CELL_UM = 512.0  # mean size of a texture-placement region (Voronoi cell)
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
    normal_variant: np.ndarray  # int (gy, gx) flip/rot90 variant 0..3 (see _Texture)
    normal_off: np.ndarray  # float (gy, gx, 2) texture offset in µm
    tumor_variant: np.ndarray
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
        a, b = size * r_ref * math.sqrt(aspect), size * r_ref / math.sqrt(aspect)
        r_unit = _ellipse_radius(shape, cy, cx, a, b, theta)
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
    mask = _components_larger(mask, 0.01 * area)
    return ~_components_larger(~mask, 0.005 * area)  # fill small holes


def _components_larger(mask: np.ndarray, size: float) -> np.ndarray:
    """Keep the 4-connected components of ``mask`` with more than ``size`` pixels."""
    # skimage's remove_small_objects renamed its size argument in 0.26; this works on any version.
    labels = measure.label(mask, connectivity=1)
    keep = np.bincount(labels.ravel()) > size
    keep[0] = False
    return keep[labels]


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
            a, b = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
            r = _ellipse_radius(tissue.shape, cy, cx, a, b, rng.uniform(0, math.pi))
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
        min_px = 6 * (128.0 / (ds * mpp)) ** 2
        min_px = min(min_px, 0.08 * tissue_bin.sum())
        blobs = _tumor_masks(rng, tissue_bin & (tissue > _HI), n_tumor, min_px)
        fields = [filters.gaussian(b.astype(np.float32), sigma=1.0, preserve_range=True).astype(np.float32)
                  for b in blobs]
        polygons = [_polygon(f, ds) for f in fields]
        tumor = np.maximum.reduce(fields) if fields else None

    # Texture placement varies per Voronoi region of a jittered grid, so
    # neither the periodic crop nor a square grid of seams is obvious.
    cell = _CELL_UM / mpp
    gy, gx = math.ceil(height / cell), math.ceil(width / cell)
    jitter = rng.uniform(-0.4, 0.4, size=(gy, gx, 2))
    grid = np.stack(np.mgrid[0:gy, 0:gx], axis=-1).astype(np.float64)
    seeds = (grid + 0.5 + jitter) * cell
    # Which normal crop a region shows follows a smooth field (~2.5 mm features),
    # so tissue has compartments instead of a 0.5 mm camouflage pattern.
    n_ctrl = max(2, round(max(width, height) * mpp / 2500.0))
    compartments = _smooth_noise(rng, (gy, gx), n_ctrl=n_ctrl)
    normal_tex = np.digitize(compartments, np.quantile(compartments, [1 / 3, 2 / 3]))
    normal_tex = (normal_tex + int(rng.integers(len(_NORMAL_TEXTURES)))) % len(_NORMAL_TEXTURES)
    return _Layout(
        ds=ds,
        tissue=tissue,
        tumor=tumor,
        polygons=polygons,
        cell=cell,
        seeds=seeds,
        normal_tex=normal_tex,
        normal_variant=rng.integers(0, 4, size=(gy, gx)),
        normal_off=rng.uniform(0, 8192, size=(gy, gx, 2)),
        tumor_variant=rng.integers(0, 4, size=(gy, gx)),
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


def _apply_lut(img: np.ndarray, lut: np.ndarray) -> np.ndarray:
    return np.stack([lut[c][img[..., c]] for c in range(3)], axis=-1)


def _seamless(img: np.ndarray, frac: float = 0.15) -> np.ndarray:
    """Make a crop tile periodically without seams by cross-fading its opposite borders.

    The result is smaller by the overlap; the wrap-around joins pixels that were
    neighbours in the crop. Mirroring would also be seamless but reads as an
    obvious kaleidoscope.
    """
    out = img.astype(np.float32)
    for axis in (1, 0):
        n = out.shape[axis]
        o = max(1, round(frac * n))
        ramp = np.linspace(0.0, 1.0, o + 2, dtype=np.float32)[1:-1]
        ramp = ramp[None, :, None] if axis == 1 else ramp[:, None, None]
        head = out.take(np.arange(o), axis=axis)
        tail = out.take(np.arange(n - o, n), axis=axis)
        out = out.take(np.arange(n - o), axis=axis)
        blended = tail * (1.0 - ramp) + head * ramp
        if axis == 1:
            out[:, :o] = blended
        else:
            out[:o] = blended
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _resample_periodic(period: np.ndarray, shape: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """Resize a periodic image to ``shape`` so that it stays seamlessly periodic."""
    h, w = period.shape[:2]
    # The filter must see the periodic neighbours, not clamped edges.
    wrapped = Image.fromarray(np.pad(period, ((h, h), (w, w), (0, 0)), mode="wrap"))
    return np.asarray(wrapped.resize((shape[1], shape[0]), method, box=(w, h, 2 * w, 2 * h)))


def _downsample_periodic(level0: np.ndarray, downsample: float) -> np.ndarray:
    h, w = level0.shape[:2]
    d = round(downsample)
    if abs(downsample - d) > 1e-9 or h % d or w % d:
        shape = (max(1, round(h / downsample)), max(1, round(w / downsample)))
        return _resample_periodic(level0, shape, Image.Resampling.BOX)
    if d == 1:
        return level0
    # Exact box average: level k is then a true downsample of level 0.
    res = level0.reshape(h // d, d, w // d, d, 3).mean(axis=(1, 3), dtype=np.float32)
    return (res + 0.5).astype(np.uint8)


def _level0_period(native: tuple[int, int], native_mpp: float, mpp: float, quantum: int) -> tuple[int, int]:
    """Level-0 size of a texture period, rounded to a multiple of ``quantum`` px."""
    return tuple(max(quantum, quantum * round(n * native_mpp / mpp / quantum)) for n in native)


@dataclass
class _Texture:
    """A periodic texture at one level's resolution, padded so any tile-sized window is a plain slice.

    Placement variants are flip-up-down (a free negative-stride view) and
    transpose (stored, since copying a transposed or left-right flipped view
    costs ~0.4 ms per tile, as much as the JPEG encode); together they give
    identity, two flips and a rot90.
    """

    ext: tuple[np.ndarray, np.ndarray]  # (plain, transposed), each (ph + pad, pw + pad, 3)
    periods: tuple[tuple[int, int], tuple[int, int]]
    pad: int

    @classmethod
    def build(cls, level0: tuple[np.ndarray, np.ndarray], downsample: float, pad: int) -> _Texture:
        """Downsample a level-0 periodic texture (plain, transposed) for a pyramid level and pad it."""
        exts, periods = [], []
        for src in level0:
            res = _downsample_periodic(src, downsample)
            ph, pw = res.shape[:2]
            ext = np.empty((ph + pad, pw + pad, 3), np.uint8)
            if pad <= min(ph, pw):
                ext[:ph, :pw] = res
                ext[:ph, pw:] = res[:, :pad]
                ext[ph:] = ext[:pad]
            else:  # tiny texture at a low level
                ext[:] = res[(np.arange(ph + pad) % ph)[:, None], (np.arange(pw + pad) % pw)[None, :]]
            exts.append(ext)
            periods.append((ph, pw))
        return cls(tuple(exts), tuple(periods), pad)

    def window(self, variant: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Rows y0..y0+h, cols x0..x0+w of the periodic tiling of a variant (bit 0: flip up-down, bit 1: transpose)."""
        transposed, flipped = bool(variant & 2), bool(variant & 1)
        ext = self.ext[transposed]
        ph, pw = self.periods[transposed]
        if flipped:
            # Flipped row Y is row -Y-1: mirroring about a pixel edge keeps every
            # level's flip aligned with level 0's.
            y0 = -y0 - h
        sy, sx = y0 % ph, x0 % pw
        if sy + h <= ph + self.pad and sx + w <= pw + self.pad:
            win = ext[sy : sy + h, sx : sx + w]
        else:  # windows larger than the padding (whole-image renders of tiny levels)
            win = ext[(np.arange(sy, sy + h) % ph)[:, None], (np.arange(sx, sx + w) % pw)[None, :]]
        return win[::-1] if flipped else win


# --------------------------------------------------------------------------- #
# Rendering
# --------------------------------------------------------------------------- #


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    # Photometric RGB means OpenSlide decodes the JPEG as RGB (no YCbCr
    # transform), like real Aperio files; encode to match, else colours shift.
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))


@dataclass
class _Axis:
    """Bilinear sampling of the layout grid along one axis for a run of level pixels."""

    first: int  # first layout sample used
    count: int  # number of layout samples used (the footprint)
    lo: np.ndarray  # per pixel: index of the lower sample, relative to first
    hi: np.ndarray  # ... of the upper sample
    frac: np.ndarray  # weight of the upper sample (float32)

    @classmethod
    def make(cls, n: int, start: int, d: float, ds: int, n_lr: int) -> _Axis:
        # Level pixel i is centred on level-0 coordinate (i + 0.5) * d; layout
        # sample j on (j + 0.5) * ds.
        u = np.clip(((np.arange(start, start + n) + 0.5) * d) / ds - 0.5, 0.0, n_lr - 1.0)
        i0 = np.minimum(np.floor(u).astype(np.int64), max(n_lr - 2, 0))
        frac = (u - i0).astype(np.float32)
        first = int(i0.min())
        count = min(int(i0.max()) + 2, n_lr) - first
        lo = i0 - first
        return cls(first, count, lo, np.minimum(lo + 1, count - 1), frac)


class _Renderer:
    """Composes tiles of one pyramid level from the slide layout and level-resampled textures."""

    def __init__(self, scene: _Scene, d: float):
        self.layout = scene.layout
        self.d = d
        self.mpp = scene.mpp * d  # µm per pixel of this level
        self.quantum = scene.quantum
        self.tile = scene.tile
        self.background = scene.background
        self.background_f = scene.background.astype(np.float32)
        self.scene = scene
        self._textures: dict[str, _Texture] = {}

    def texture(self, name: str) -> _Texture:
        if name not in self._textures:
            self._textures[name] = _Texture.build(self.scene.texture(name), self.d, self.tile)
        return self._textures[name]

    # -- texture placement -------------------------------------------------- #

    def _nearest_seed(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Voronoi region id of level-0 points (broadcast y against x)."""
        lay = self.layout
        gy, gx = lay.seeds.shape[:2]
        y, x = np.broadcast_arrays(y, x)
        ci = np.floor(y / lay.cell).astype(np.int64)
        cj = np.floor(x / lay.cell).astype(np.int64)
        best = np.full(y.shape, np.inf)
        label = np.zeros(y.shape, np.int64)
        # A seed jittered by at most ±0.4 cell is never nearest beyond 2 cells away.
        for di in range(-2, 3):
            for dj in range(-2, 3):
                i = np.clip(ci + di, 0, gy - 1)
                j = np.clip(cj + dj, 0, gx - 1)
                s = lay.seeds[i, j]
                dist = (s[..., 0] - y) ** 2 + (s[..., 1] - x) ** 2
                closer = dist < best
                best[closer] = dist[closer]
                label[closer] = (i * gx + j)[closer]
        return label

    def tile_regions(self, ny: int, nx: int) -> np.ndarray:
        """Per tile: its Voronoi region id when it lies in a single region, else -1."""
        edge = self.tile * self.d
        corners = self._nearest_seed((np.arange(ny + 1) * edge)[:, None], (np.arange(nx + 1) * edge)[None, :])
        c = corners[:-1, :-1]
        # Voronoi cells are convex: 4 corners in one cell = whole tile in it.
        single = (c == corners[1:, :-1]) & (c == corners[:-1, 1:]) & (c == corners[1:, 1:])
        return np.where(single, c, -1)

    def _pixel_regions(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Regions of a level rectangle: (region ids present, their label values, per-pixel uint8 labels)."""
        lay = self.layout
        gy, gx = lay.seeds.shape[:2]
        d = self.d
        ya, yb = y0 * d, (y0 + h) * d
        xa, xb = x0 * d, (x0 + w) * d
        i0, i1 = max(0, int(ya // lay.cell) - 2), min(gy, int(yb // lay.cell) + 3)
        j0, j1 = max(0, int(xa // lay.cell) - 2), min(gx, int(xb // lay.cell) + 3)
        seeds = lay.seeds[i0:i1, j0:j1].reshape(-1, 2)
        ids = (np.arange(i0, i1)[:, None] * gx + np.arange(j0, j1)[None, :]).ravel()
        centre = np.array([(ya + yb) / 2, (xa + xb) / 2])
        dist = np.sqrt(((seeds - centre) ** 2).sum(-1))
        keep = np.flatnonzero(dist <= dist.min() + math.hypot(yb - ya, xb - xa))
        # |p - s|^2 - |p|^2 is linear in p: cheap to evaluate per candidate.
        # Coordinates relative to the centre keep float32 exact enough.
        py = ((np.arange(y0, y0 + h) + 0.5) * d - centre[0]).astype(np.float32)[:, None]
        px = ((np.arange(x0, x0 + w) + 0.5) * d - centre[1]).astype(np.float32)[None, :]
        rel = (seeds[keep] - centre).astype(np.float32)
        dtype = np.uint8 if len(keep) <= 256 else np.uint16  # many only for thumbnail-scale tiles
        label = np.zeros((h, w), dtype)
        best = None
        for n, (sy, sx) in enumerate(rel):
            val = (sy * sy + sx * sx) - 2 * sy * py - 2 * sx * px
            if best is None:
                best = val
                continue
            closer = val < best
            np.copyto(label, dtype(n), where=closer)
            if n < len(rel) - 1:
                np.minimum(best, val, out=best)
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=len(keep)))
        return ids[keep[present]], present, label

    def _window(self, kind: str, rid: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        lay = self.layout
        iy, ix = divmod(int(rid), lay.seeds.shape[1])
        if kind == "normal":
            name = _NORMAL_TEXTURES[lay.normal_tex[iy, ix]][0]
            variant, off = lay.normal_variant[iy, ix], lay.normal_off[iy, ix]
        else:
            name, variant, off = _TUMOR_TEXTURE[0], lay.tumor_variant[iy, ix], lay.tumor_off[iy, ix]
        tex = self.texture(name)
        # Level-0 offsets are multiples of the period quantum, hence exact at every level.
        q = self.quantum
        oy = int(q * (off[0] // (q * self.mpp / self.d)) / self.d)
        ox = int(q * (off[1] // (q * self.mpp / self.d)) / self.d)
        return tex.window(int(variant), y0 + oy, x0 + ox, h, w)

    def _layer(self, kind: str, regions, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        if isinstance(regions, int):
            return self._window(kind, regions, y0, x0, h, w)
        ids, values, labels = regions
        out = np.array(self._window(kind, ids[0], y0, x0, h, w))
        for rid, value in zip(ids[1:], values[1:]):
            # Bitwise select: several times faster than boolean-mask assignment on RGB.
            m8 = (labels == value).view(np.uint8) * np.uint8(255)
            mask = np.stack([m8, m8, m8], axis=-1)
            out ^= (out ^ self._window(kind, rid, y0, x0, h, w)) & mask
        return out

    # -- masks -------------------------------------------------------------- #

    @staticmethod
    def _alpha(field: np.ndarray, ay: _Axis, ax: _Axis) -> np.ndarray:
        # Explicit gathers, not a matmul: OpenBLAS thread wake-ups made tiny
        # matmuls cost milliseconds.
        sub = field[ay.first : ay.first + ay.count, ax.first : ax.first + ax.count]
        rows = sub[ay.lo] * (1.0 - ay.frac)[:, None] + sub[ay.hi] * ay.frac[:, None]
        m = rows[:, ax.lo] * (1.0 - ax.frac) + rows[:, ax.hi] * ax.frac
        return np.clip((m - 0.5) * _EDGE_SHARPNESS + 0.5, 0.0, 1.0)[..., None]

    def render(self, y0: int, x0: int, h: int, w: int, wy: _Axis | None = None, wx: _Axis | None = None,
               region: int | None = None) -> np.ndarray | None:
        """RGB pixels of a level rectangle, or None when it is pure background.

        ``region`` is the rectangle's Voronoi region id if known to be single,
        -1 if known to straddle regions, None if unknown.
        """
        lay = self.layout
        n_lr_y, n_lr_x = lay.tissue.shape
        wy = wy or _Axis.make(h, y0, self.d, lay.ds, n_lr_y)
        wx = wx or _Axis.make(w, x0, self.d, lay.ds, n_lr_x)
        sl = np.s_[wy.first : wy.first + wy.count, wx.first : wx.first + wx.count]
        # Bilinear values are convex combinations of the footprint samples, so
        # the footprint's min/max bound the whole rectangle.
        foot = lay.tissue[sl]
        if foot.max() <= _LO:
            return None
        regions = int(region) if region is not None and region >= 0 else self._pixel_regions(y0, x0, h, w)
        if isinstance(regions, tuple) and len(regions[0]) == 1:
            regions = int(regions[0][0])
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
        regions = self.tile_regions(ny, nx)
        col_w = [_Axis.make(ts, tx * ts, self.d, self.layout.ds, n_lr_x) for tx in range(nx)]
        for ty in range(ny):
            row_w = _Axis.make(ts, ty * ts, self.d, self.layout.ds, n_lr_y)
            for tx in range(nx):
                pix = self.render(ty * ts, tx * ts, ts, ts, row_w, col_w[tx], regions[ty, tx])
                yield white if pix is None else _jpeg(np.ascontiguousarray(pix), quality)
            pbar.update(nx)

    def image(self, height: int, width: int) -> np.ndarray:
        """Whole level in memory (thumbnail-sized levels only)."""
        ts = self.tile
        ny, nx = math.ceil(height / ts), math.ceil(width / ts)
        regions = self.tile_regions(ny, nx)
        out = np.empty((ny * ts, nx * ts, 3), np.uint8)
        for ty in range(ny):
            for tx in range(nx):
                pix = self.render(ty * ts, tx * ts, ts, ts, region=regions[ty, tx])
                out[ty * ts : (ty + 1) * ts, tx * ts : (tx + 1) * ts] = self.background if pix is None else pix
        return out[:height, :width]


@dataclass
class _Scene:
    """Everything that defines a slide's pixels, independent of pyramid level."""

    layout: _Layout
    native: dict[str, np.ndarray]  # seamless, stain-jittered texture periods at native resolution
    background: np.ndarray  # (tile, tile, 3) uint8
    mpp: float
    tile: int
    quantum: int  # texture periods and offsets are multiples of this many level-0 px
    _level0: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def create(cls, *, width: int, height: int, mpp: float, tile_size: int, n_tumor: int, seed: int) -> _Scene:
        if tile_size % 16:
            raise ValueError("tile_size must be a multiple of 16 (TIFF JPEG tiles)")
        if width < 1 or height < 1 or mpp <= 0:
            raise ValueError("width, height and mpp must be positive")
        rng = np.random.default_rng(seed)
        layout = _make_layout(rng, width, height, mpp, n_tumor)
        lut = _stain_lut(rng)
        # Scanner background: not pure white, slightly tinted, a little noisy.
        colour = 240.0 + rng.uniform(-3, 3) + rng.uniform(-1.5, 1.5, size=3)
        noise = rng.normal(0, 1.0, size=(tile_size, tile_size, 3))
        background = np.clip(np.round(colour + noise), 0, 255).astype(np.uint8)
        native = {name: _seamless(_apply_lut(_load_texture(name), lut)) for name, _ in _ALL_TEXTURES}

        # Periods divisible by every pyramid downsample make each level's texture
        # an exact box-downsample of level 0 with the same placement; capped so
        # rounding never stretches a texture by more than a few percent.
        smallest = min(min(native[name].shape[:2]) * nat / mpp for name, nat in _ALL_TEXTURES)
        largest_downsample = _level_sizes(width, height)[-1][0]
        quantum = 1
        while quantum * _LEVEL_FACTOR <= largest_downsample and quantum * _LEVEL_FACTOR * 16 <= smallest:
            quantum *= _LEVEL_FACTOR
        return cls(layout, native, background, mpp, tile_size, quantum)

    def texture(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 periodic texture, plain and transposed (built on first use: small slides need few)."""
        if name not in self._level0:
            nat = dict(_ALL_TEXTURES)[name]
            shape = _level0_period(self.native[name].shape[:2], nat, self.mpp, self.quantum)
            img = Image.fromarray(_resample_periodic(self.native[name], shape, Image.Resampling.LANCZOS))
            # PIL transposes ~10x faster than a numpy copy of a transposed view.
            self._level0[name] = (np.asarray(img), np.asarray(img.transpose(Image.Transpose.TRANSPOSE)))
        return self._level0[name]

    def renderer(self, downsample: float) -> _Renderer:
        return _Renderer(self, downsample)


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
    scene = _Scene.create(width=width, height=height, mpp=mpp, tile_size=tile_size, n_tumor=n_tumor, seed=seed)
    white = _jpeg(scene.background, quality)  # shared by every background tile of every level
    levels = _level_sizes(width, height)
    meta = f"|AppMag = {40 if mpp < 0.375 else 20}|MPP = {mpp}"
    common = dict(
        photometric="rgb",
        compression="jpeg",
        # Only used for the tags (and the thumbnail): tiles arrive pre-encoded.
        compressionargs={"level": quality, "outcolorspace": "RGB"},
        subsampling=(1, 1),
        metadata=None,
        resolutionunit="CENTIMETER",
    )

    n_tiles = sum(math.ceil(w / tile_size) * math.ceil(h / tile_size) for _, w, h in levels)
    renderer = scene.renderer(1.0)
    bigtiff = False
    if 1.1 * n_tiles * tile_size * tile_size * 3 > _BIGTIFF_ABOVE:  # JPEG is far smaller than raw; else estimate
        sample = max(len(_jpeg(np.ascontiguousarray(renderer.texture(name).window(0, 0, 0, tile_size, tile_size)),
                               quality)) for name, _ in _ALL_TEXTURES)
        estimate = _estimate_bytes(scene.layout, levels, tile_size, int(1.3 * sample), len(white))
        bigtiff = estimate > _BIGTIFF_ABOVE
        logger.debug("%s: estimated %.0f MB, bigtiff=%s", path.name, estimate / 1e6, bigtiff)

    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=n_tiles, unit="tile", desc=path.name, disable=not progress, leave=False)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tw, bar as pbar:
        for i, (d, w, h) in enumerate(levels):
            if i > 0:
                renderer = scene.renderer(float(d))
            if i == 0:
                desc = f"{_APERIO_HEADER}{width}x{height} ({tile_size}x{tile_size}) JPEG/RGB Q={quality}{meta}"
            else:
                desc = (f"{_APERIO_HEADER}{width}x{height} -> {w}x{h} - ({tile_size}x{tile_size}) "
                        f"JPEG/RGB Q={quality}{meta}")
            tw.write(
                renderer.tiles(h, w, quality, white, pbar),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile_size, tile_size),
                description=desc,
                resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                **common,
            )
            del renderer  # level-0 textures are the big ones
            if i == 0:
                # Page 1 is the thumbnail in real SVS files; OpenSlide lists it as an
                # associated image and tifffile's SVS parser expects it there.
                d_thumb = max(1.0, max(width, height) / _THUMBNAIL_PX)
                t_w, t_h = max(1, round(width / d_thumb)), max(1, round(height / d_thumb))
                tw.write(
                    scene.renderer(d_thumb).image(t_h, t_w),
                    description=f"{_APERIO_HEADER}{width}x{height} -> {t_w}x{t_h} - {meta}",
                    rowsperstrip=16,
                    **common,
                )

    logger.info(
        "wrote %s: %dx%d, %d levels, %d tumor regions, %.1f MB in %.1f s",
        path, width, height, len(levels), len(scene.layout.polygons), path.stat().st_size / 1e6,
        time.perf_counter() - t0,
    )
    return scene.layout.polygons


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
        tumor = i in positives
        if tumor:
            if not polygons:
                logger.warning("%s is labelled tumor but no tumor region fitted in its tissue", slide_id)
            ann.write_text(json.dumps(_geojson(polygons)))
        else:
            ann.unlink(missing_ok=True)  # stale file from an earlier cohort in the same folder
        slides.append(
            SynthSlide(
                slide_id=slide_id,
                path=job["path"],
                label="tumor" if tumor else "normal",
                width=width,
                height=height,
                mpp=mpp,
                annotation_path=ann if tumor else None,
            )
        )
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label"])
        writer.writerows((s.slide_id, s.label) for s in slides)
    logger.info("cohort of %d slides (%d tumor) in %s", n_slides, len(positives), out)
    return slides
