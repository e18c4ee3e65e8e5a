"""Textures: H&E crops from wsi/data, per-slide stain jitter, seamless periodic tiling and resampling."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

import numpy as np
from PIL import Image

# (file, native µm/px); µm/px values come from wsi/data/README.md
_NORMAL_TEXTURES = (("normal_0.jpg", 0.499), ("normal_1.jpg", 0.499), ("normal_2.jpg", 0.499))
_TUMOR_TEXTURE = ("tumor_0.jpg", 0.4)
_ALL_TEXTURES = (*_NORMAL_TEXTURES, _TUMOR_TEXTURE)


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
