"""Pyramid shape and tile format, shared by the renderer and the TIFF writer."""

from __future__ import annotations

import imagecodecs
import numpy as np

_LOWEST_LEVEL_PX = 2048
_LEVEL_FACTOR = 4


def _level_sizes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per pyramid level, 4× apart, until the long side is <= 2048."""
    levels = [(1, width, height)]
    while max(levels[-1][1], levels[-1][2]) > _LOWEST_LEVEL_PX:
        d = levels[-1][0] * _LEVEL_FACTOR
        levels.append((d, max(1, width // d), max(1, height // d)))
    return levels


def _jpeg(tile: np.ndarray, quality: int) -> bytes:
    # Photometric RGB means OpenSlide decodes the JPEG as RGB (no YCbCr
    # transform), like real Aperio files; encode to match, else colours shift.
    return imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))
