"""Pixels of a slide that the store does not hold: tiles read through the slide file, thumbnails.

One tile reader per (process, slide) is cached, so a DataLoader worker opens each slide once; the
process id is part of the key, so a forked worker never reuses its parent's openslide handle.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SlideError, StoreError
from .meta import SlideMeta

if TYPE_CHECKING:
    from .view import SlideView

log = logging.getLogger(__name__)
_READERS: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_OPEN = 4


def _no_pixels(meta: SlideMeta, store_path, why: str) -> StoreError:
    return StoreError(f"{store_path}: slide {meta.slide_id!r}: {why}")


def slide_reader(meta: SlideMeta, store_path=None):
    """The cached (slide, TileReader) of a tiled slide, opened in this process on first use."""
    from ..slide import open_slide
    from ..tiling import TileReader, tile_geometry

    if meta.features_only:
        raise _no_pixels(meta, store_path, "imported with features only, so its pixels were never stored; tile "
                                           "its slide file with `wsi tile` into a store to read tiles")
    key = (os.getpid(), meta.source, meta.slide_mpp, meta.target_mpp, meta.patch_size, meta.overlap)
    if key in _READERS:
        _READERS.move_to_end(key)
        return _READERS[key]
    if not meta.source or not Path(meta.source).exists():
        raise _no_pixels(meta, store_path, f"tiles were not stored and its slide file {meta.source} is gone; "
                                           "restore the file (or tile it again without --no-tiles)")
    try:
        slide = open_slide(meta.source, meta.slide_mpp)
    except SlideError as e:
        raise _no_pixels(meta, store_path, f"tiles were not stored and its slide file cannot be read ({e})") from None
    geom = tile_geometry(slide, meta.target_mpp, meta.patch_size, meta.overlap)
    if meta.tile_size_level0 and abs(geom.patch_size_level0 - meta.tile_size_level0) > 1:
        slide.close()
        raise _no_pixels(meta, store_path, f"its slide file {meta.source} no longer matches the store (tile side "
                                           f"{geom.patch_size_level0} px at level 0, stored {meta.tile_size_level0}); "
                                           "tile it again with --overwrite")
    _READERS[key] = (slide, TileReader(slide, geom))
    while len(_READERS) > _MAX_OPEN:
        _, (s, r) = _READERS.popitem(last=False)
        r.close()
        s.close()
    return _READERS[key]


def read_from_slide(meta: SlideMeta, coords: np.ndarray, store_path=None) -> np.ndarray:
    """uint8 (n, P, P, 3) tiles at level-0 `coords`, read as `wsi tile` reads them."""
    _, reader = slide_reader(meta, store_path)
    return reader.read_many(np.asarray(coords))


def thumbnail(view: "SlideView", max_px: int) -> tuple[np.ndarray, tuple[float, float]]:
    meta = view.meta
    why = "the store records no slide file"
    if meta.source and not meta.features_only:
        from ..slide import open_slide
        from ..viz import overview_image

        try:
            with open_slide(meta.source, meta.slide_mpp) as slide:
                img, ds = overview_image(slide, max_px)
                return np.ascontiguousarray(img[..., :3], dtype=np.uint8), (float(ds[0]), float(ds[1]))
        except (SlideError, OSError) as e:
            why = f"its slide file cannot be read ({e})"
    if view.has_tiles:
        return _mosaic(view, max_px)
    raise _no_pixels(meta, view.store.path, f"no thumbnail: {why}, and no tiles are stored")


def _mosaic(view: "SlideView", max_px: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The stored tiles pasted at their coords on white, downscaled to `max_px`."""
    import cv2

    m, coords = view.meta, view.coords
    size0 = float(m.tile_size_level0 or m.patch_size or 1)
    w, h = view.level0_size
    ds = max(w, h) / max_px
    img = np.full((max(1, round(h / ds)), max(1, round(w / ds)), 3), 255, np.uint8)
    side = max(1, round(size0 / ds))
    for idx, tiles in view.iter_tiles():
        for t, (x, y) in zip(tiles, coords[idx]):
            x0, y0 = int(x / ds), int(y / ds)
            small = cv2.resize(t, (side, side), interpolation=cv2.INTER_AREA)
            region = img[y0:y0 + side, x0:x0 + side]
            region[:] = small[:region.shape[0], :region.shape[1]]
    return img, (w / img.shape[1], h / img.shape[0])
