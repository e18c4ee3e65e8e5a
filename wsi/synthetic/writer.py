"""TIFF writing: one pyramidal Aperio-like slide, tile by tile."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage import morphology
from tqdm.auto import tqdm

from .layout import _LO, _Layout
from .pyramid import _jpeg, _level_sizes
from .render import _Scene

logger = logging.getLogger(__name__)

# Defaults for a synthetic slide, shared by write_slide and make_cohort (and so by `wsi synth`).
DEFAULT_WIDTH, DEFAULT_HEIGHT = 16384, 12288
DEFAULT_MPP = 0.25          # µm/px at level 0, ≈ 40×
DEFAULT_TILE_SIZE = 256

_THUMBNAIL_PX = 1024
_BIGTIFF_ABOVE = 3.5e9  # bytes; classic TIFF offsets overflow at 4 GiB
_APERIO_HEADER = "Aperio Image Library v12.0.0 \n"


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
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    mpp: float = DEFAULT_MPP,
    tile_size: int = DEFAULT_TILE_SIZE,
    n_tumor: int = 0,
    seed: int = 0,
    quality: int = 80,
    progress: bool = True,
    spec=None,
) -> list[np.ndarray]:
    """Write one pyramidal Aperio-like TIFF; return tumor polygons (level-0 x,y float arrays, Kx2).

    Pages: level 0 (tiled JPEG), a stripped thumbnail (as in real SVS files, so
    tifffile's SVS reader also sees the pyramid), then levels downsampled 4× each
    until the long side is <= 2048 px. Polygons are closed rings (first vertex
    repeated last), one per tumor region (and cluster); empty when ``n_tumor`` is 0.
    ``spec`` (a `difficulty.SlideSpec`, as `make_cohort` draws it) adds the hard parts;
    its JPEG quality replaces ``quality``.
    """
    return _write_slide(path, width=width, height=height, mpp=mpp, tile_size=tile_size, n_tumor=n_tumor,
                        seed=seed, quality=quality, progress=progress, spec=spec).polygons


def _write_slide(path, *, width: int, height: int, mpp: float, tile_size: int, n_tumor: int, seed: int,
                 quality: int, progress: bool, spec) -> _Layout:
    t0 = time.perf_counter()
    path = Path(path)
    if spec is not None:
        quality = spec.quality
    scene = _Scene.create(width=width, height=height, mpp=mpp, tile_size=tile_size, n_tumor=n_tumor, seed=seed,
                          spec=spec)
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
                               quality)) for name in scene.native)
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
    return scene.layout
