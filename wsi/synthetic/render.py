"""The scene (everything that defines a slide's pixels) and its per-level tile renderer.

The layout (tissue and tumor masks) lives on a coarse grid (~32 µm/px); every
pyramid level samples the same masks and the same physically-scaled texture
placement, so level k looks like a downsample of level 0. Tiles are generated
and encoded one at a time and background tiles share one pre-encoded JPEG, so no
level is ever held in memory and 100k-pixel slides take minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
from PIL import Image

from .layout import _EDGE_SHARPNESS, _HI, _LO, _Layout, _make_layout
from .pyramid import _LEVEL_FACTOR, _jpeg, _level_sizes
from .textures import (
    _ALL_TEXTURES,
    _NORMAL_TEXTURES,
    _Texture,
    _apply_lut,
    _blur_periodic,
    _hed_jitter,
    _level0_period,
    _load_texture,
    _native_mpp,
    _resample_periodic,
    _seamless,
    _stain_lut,
)


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
        """``kind``: "normal" (the region's normal texture) or an overlay's texture name."""
        lay = self.layout
        iy, ix = divmod(int(rid), lay.seeds.shape[1])
        if kind == "normal":
            name = _NORMAL_TEXTURES[lay.normal_tex[iy, ix]][0]
            variant, off = lay.normal_variant[iy, ix], lay.normal_off[iy, ix]
        else:
            name, variant, off = kind, lay.tumor_variant[iy, ix], lay.tumor_off[iy, ix]
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
        # Overlays (tumour, mimics, inflammation) whose footprint reaches this rectangle, in drawing order.
        active = [(name, f) for name, f in lay.overlays if f[sl].max() > _LO]
        partial = foot.min() < _HI
        if not active and not partial:
            return pix  # hot path: interior normal tissue, no blending
        img = pix.astype(np.float32)
        for name, f in active:
            over = self._layer(name, regions, y0, x0, h, w).astype(np.float32)
            img += self._alpha(f, wy, wx) * (over - img)
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
    def create(cls, *, width: int, height: int, mpp: float, tile_size: int, n_tumor: int, seed: int,
               spec=None) -> _Scene:
        """``spec``: a `difficulty.SlideSpec` (textures, small regions, stain, blur); None: the easy slide."""
        if tile_size % 16:
            raise ValueError("tile_size must be a multiple of 16 (TIFF JPEG tiles)")
        if width < 1 or height < 1 or mpp <= 0:
            raise ValueError("width, height and mpp must be positive")
        rng = np.random.default_rng(seed)
        layout = _make_layout(rng, width, height, mpp, n_tumor, spec)
        lut = _stain_lut(rng)
        # Scanner background: not pure white, slightly tinted, a little noisy.
        colour = 240.0 + rng.uniform(-3, 3) + rng.uniform(-1.5, 1.5, size=3)
        noise = rng.normal(0, 1.0, size=(tile_size, tile_size, 3))
        background = np.clip(np.round(colour + noise), 0, 255).astype(np.uint8)
        names = list(dict.fromkeys([name for name, _ in _ALL_TEXTURES] + [name for name, _ in layout.overlays]))
        native = {}
        for name in names:
            img = _apply_lut(_load_texture(name), lut)
            if spec is not None and spec.stain is not None:
                img = _hed_jitter(img, spec.stain)
            img = _seamless(img)
            if spec is not None and spec.blur_um > 0:
                img = _blur_periodic(img, spec.blur_um / _native_mpp(name))
            native[name] = img

        # Periods divisible by every pyramid downsample make each level's texture
        # an exact box-downsample of level 0 with the same placement; capped so
        # rounding never stretches a texture by more than a few percent.
        smallest = min(min(native[name].shape[:2]) * _native_mpp(name) / mpp for name in names)
        largest_downsample = _level_sizes(width, height)[-1][0]
        quantum = 1
        while quantum * _LEVEL_FACTOR <= largest_downsample and quantum * _LEVEL_FACTOR * 16 <= smallest:
            quantum *= _LEVEL_FACTOR
        return cls(layout, native, background, mpp, tile_size, quantum)

    def texture(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 periodic texture, plain and transposed (built on first use: small slides need few)."""
        if name not in self._level0:
            nat = _native_mpp(name)
            shape = _level0_period(self.native[name].shape[:2], nat, self.mpp, self.quantum)
            img = Image.fromarray(_resample_periodic(self.native[name], shape, Image.Resampling.LANCZOS))
            # PIL transposes ~10x faster than a numpy copy of a transposed view.
            self._level0[name] = (np.asarray(img), np.asarray(img.transpose(Image.Transpose.TRANSPOSE)))
        return self._level0[name]

    def renderer(self, downsample: float) -> _Renderer:
        return _Renderer(self, downsample)

