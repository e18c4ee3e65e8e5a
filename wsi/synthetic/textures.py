"""Textures: H&E crops from wsi/data, their variants, per-slide stain jitter and blur, seamless periodic
tiling and resampling.

Variants (tumour grades, benign mimics, inflammation) are real pixels: a shipped crop transformed in
HED space (colour deconvolution: haematoxylin = nuclei, eosin = cytoplasm and stroma) by scaling the
stain densities and by grey morphology on the haematoxylin channel (nuclei grown, shrunk or cut out
of their background), and rendered at a different physical scale (denser or sparser cells).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
from PIL import Image

# (file, native µm/px); µm/px values come from wsi/data/README.md
_NORMAL_TEXTURES = (("normal_0.jpg", 0.499), ("normal_1.jpg", 0.499), ("normal_2.jpg", 0.499))
_TUMOR_TEXTURE = ("tumor_0.jpg", 0.4)
_ALL_TEXTURES = (*_NORMAL_TEXTURES, _TUMOR_TEXTURE)


@dataclass(frozen=True)
class _Variant:
    """A texture made from a shipped crop: crop, HED stain scaling, nuclear morphology, physical scale."""

    source: str
    scale: float = 1.0  # physical size factor (< 1: smaller, denser cells): native µm/px × scale
    crop: tuple[float, float, float, float] | None = None  # (y0, x0, y1, x1) as fractions of the crop
    h: float = 1.0  # haematoxylin optical density factor
    e: float = 1.0  # eosin optical density factor
    grow: int = 0  # grey dilation (> 0) or erosion (< 0) radius of the haematoxylin channel, px: nuclear size
    tophat: int = 0  # > 0: keep only haematoxylin structures smaller than this radius (small round nuclei)
    background: float = 1.0  # with tophat: how much of the rest of the haematoxylin is kept


# Tumour textures in the order `tumor_textures` takes them: the carcinoma crop as shipped, then grades.
TUMOR_TEXTURES = ("tumor_0.jpg", "tumor_highgrade", "tumor_dense", "tumor_eosinophilic")
MIMIC_TEXTURES = ("mimic_reactive", "mimic_hyperplasia")
INFLAMMATION_TEXTURE = "inflammation"
_VARIANTS = {
    # enlarged, hyperchromatic nuclei
    "tumor_highgrade": _Variant("tumor_0.jpg", grow=2, h=1.25, e=0.9),
    # smaller, crowded cells
    "tumor_dense": _Variant("tumor_0.jpg", scale=0.7, h=1.3),
    # another part of the crop, more cytoplasm, pinker (better differentiated)
    "tumor_eosinophilic": _Variant("tumor_0.jpg", scale=1.25, crop=(0.35, 0.35, 1.0, 1.0), h=0.85, e=1.35),
    # benign mimic from the carcinoma: smaller, paler nuclei in larger cells -- close, not the same
    "mimic_reactive": _Variant("tumor_0.jpg", scale=1.15, crop=(0.0, 0.0, 0.65, 0.65), grow=-2, h=0.95, e=1.05),
    # benign mimic from normal epidermis: crowded, enlarged, dark nuclei
    "mimic_hyperplasia": _Variant("normal_0.jpg", scale=0.9, grow=2, h=1.15, e=0.95),
    # lymphocyte-like infiltrate: the small nuclei of the basal epidermis, dark, crowded, little cytoplasm
    "inflammation": _Variant("normal_2.jpg", scale=0.85, crop=(0.15, 0.0, 1.0, 0.5), tophat=5, h=2.5, e=0.5,
                             background=0.5),
}


def _native_mpp(name: str) -> float:
    """Native µm/px of a texture (a shipped crop or a variant of one)."""
    base = dict(_ALL_TEXTURES)
    if name in base:
        return base[name]
    v = _VARIANTS[name]
    return base[v.source] * v.scale


def _od_to_rgb(hed: np.ndarray) -> np.ndarray:
    from skimage import color

    return (np.clip(color.hed2rgb(hed), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _load_texture(name: str) -> np.ndarray:
    """A texture's native pixels (read-only: shared between the slides written by one process)."""
    if name in _VARIANTS:
        img = _make_variant(_VARIANTS[name])
    else:
        with (files("wsi") / "data" / name).open("rb") as fh:
            img = np.asarray(Image.open(fh).convert("RGB"))
    img.flags.writeable = False
    return img


def _make_variant(v: _Variant) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage import color, morphology

    img = _load_texture(v.source)
    if v.crop is not None:
        h, w = img.shape[:2]
        y0, x0, y1, x1 = v.crop
        img = img[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)]
    hed = color.rgb2hed(img)
    nuclei = hed[..., 0]
    if v.tophat:
        top = ndi.white_tophat(nuclei, footprint=morphology.disk(v.tophat))
        top = ndi.grey_opening(top, footprint=morphology.disk(1))  # rounder
        nuclei = top + v.background * (nuclei - top)
    if v.grow > 0:
        nuclei = ndi.grey_dilation(nuclei, footprint=morphology.disk(v.grow))
    elif v.grow < 0:
        nuclei = ndi.grey_erosion(nuclei, footprint=morphology.disk(-v.grow))
    return _od_to_rgb(np.stack([nuclei * v.h, hed[..., 1] * v.e, hed[..., 2]], axis=-1))


def _hed_jitter(img: np.ndarray, scales: tuple[float, float, float]) -> np.ndarray:
    """Stain variation: haematoxylin, eosin and residual optical densities scaled per slide (Tellez et al. 2018)."""
    from skimage import color

    return _od_to_rgb(color.rgb2hed(img) * np.asarray(scales, np.float64))


def _blur_periodic(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Scanner defocus: Gaussian blur of a periodic texture (wrapping, so it stays seamless)."""
    from scipy import ndimage as ndi

    if sigma_px <= 0:
        return img
    out = ndi.gaussian_filter(img.astype(np.float32), sigma=(sigma_px, sigma_px, 0), mode="wrap")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


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
