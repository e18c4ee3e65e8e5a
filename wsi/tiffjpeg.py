"""Read a tiled JPEG TIFF/SVS level by decoding its own tiles, downscaled inside the JPEG decoder.

openslide decodes every JPEG tile a region touches at full size, then we would resize. For a
0.25 -> 0.5 µm/px tile that is 4-9 full decodes plus a resize. Here each slide tile is decoded once,
at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (cv2's IMREAD_REDUCED_*), which skips most of the
inverse DCT work. Pixels match openslide + area resize within JPEG-decoder tolerance (tested).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_SCALE_FLAGS = {1: "IMREAD_COLOR", 2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4",
                8: "IMREAD_REDUCED_COLOR_8"}
# Adobe APP14 with transform=0: tells libjpeg the components are RGB, not YCbCr. TIFF writers
# (Aperio among them) store photometric=RGB tiles without any marker saying so, and a bare
# libjpeg would guess YCbCr and shift every colour; openslide forces RGB the same way.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
SUPPORTED_SCALES = tuple(_SCALE_FLAGS)


class JpegTileReader:
    """Region reads from one tiled, JPEG-compressed TIFF page (one pyramid level)."""

    def __init__(self, path: Path, page_index: int):
        import tifffile

        self.path = Path(path)
        with tifffile.TiffFile(self.path) as tf:
            page = tf.pages[page_index]
            self.width, self.height = int(page.imagewidth), int(page.imagelength)
            self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
            self.offsets = np.asarray(page.dataoffsets, np.int64)
            self.counts = np.asarray(page.databytecounts, np.int64)
            tables = page.jpegtables or b""
            rgb = int(page.photometric) == 2
        self.tiles_x = -(-self.width // self.tile_w)
        # Every tile becomes SOI [+ Adobe RGB marker] + shared tables + the tile's own segments.
        head = b"\xff\xd8" + (_ADOBE_RGB if rgb else b"")
        self._prefix = head + (tables[2:-2] if tables else b"")
        self._fd = os.open(self.path, os.O_RDONLY)

    @classmethod
    def for_level(cls, path: str | Path, width: int, height: int) -> "JpegTileReader | None":
        """The reader for the tiled JPEG page of this size, or None when the file has none."""
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                for i, page in enumerate(tf.pages):
                    if (page.is_tiled and int(page.compression) == 7 and page.samplesperpixel == 3
                            and page.imagewidth == width and page.imagelength == height
                            and page.planarconfig == 1 and page.bitspersample == 8):
                        return cls(Path(path), i)
        except Exception:
            return None
        return None

    def can_read(self, x: int, y: int, scale: int) -> bool:
        """Whether a region at level pixel (x, y) decodes exactly at `scale` (tile-grid aligned)."""
        return (scale in _SCALE_FLAGS and x % scale == 0 and y % scale == 0
                and self.tile_w % scale == 0 and self.tile_h % scale == 0)

    def decode_tile(self, index: int, scale: int = 1) -> np.ndarray:
        """One slide tile at 1/`scale`, in cv2's BGR order (callers convert once per region)."""
        import cv2

        n = int(self.counts[index])
        if n == 0:  # sparse TIFF tile: never written, reads as background
            return np.full((self.tile_h // scale, self.tile_w // scale, 3), 255, np.uint8)
        data = os.pread(self._fd, n, int(self.offsets[index]))
        if len(data) != n:
            raise OSError(f"{self.path}: tile {index} is cut short ({len(data)} of {n} bytes); the file is truncated")
        bgr = cv2.imdecode(np.frombuffer(self._prefix + data[2:], np.uint8), getattr(cv2, _SCALE_FLAGS[scale]))
        if bgr is None:
            raise OSError(f"{self.path}: tile {index} is not valid JPEG data")
        return bgr

    def read(self, x: int, y: int, w: int, h: int, scale: int = 1) -> np.ndarray:
        """Level pixels [x, x+w) × [y, y+h), downscaled by `scale`: (h/scale, w/scale, 3) uint8."""
        import cv2

        if not self.can_read(x, y, scale):
            raise ValueError(f"region at ({x}, {y}) cannot be decoded at 1/{scale} scale")
        tw, th = self.tile_w, self.tile_h
        x1, y1 = min(x + w, self.width), min(y + h, self.height)
        covered = x >= 0 and y >= 0 and x1 == x + w and y1 == y + h
        out = np.empty((h // scale, w // scale, 3), np.uint8) if covered else \
            np.full((h // scale, w // scale, 3), 255, np.uint8)
        for ty in range(max(y, 0) // th, (y1 - 1) // th + 1):
            for tx in range(max(x, 0) // tw, (x1 - 1) // tw + 1):
                tile = self.decode_tile(ty * self.tiles_x + tx, scale)
                # Intersection of this tile with the region (and the image), in level pixels.
                ax0, ay0 = max(tx * tw, x), max(ty * th, y)
                ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
                if ax1 <= ax0 or ay1 <= ay0:
                    continue
                s = scale
                out[(ay0 - y) // s:(ay1 - y) // s, (ax0 - x) // s:(ax1 - x) // s] = \
                    tile[(ay0 - ty * th) // s:(ay1 - ty * th) // s, (ax0 - tx * tw) // s:(ax1 - tx * tw) // s]
        return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()
