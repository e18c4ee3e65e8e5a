"""Pictures of what tiling did: thumbnail, tissue contour, kept tiles."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .slide import Slide
from .tissue import TissueMask, contours, thumbnail

TISSUE_RGB = (0, 170, 0)
TILE_RGB = (30, 90, 230)


def overview_image(slide: Slide, max_side: int = 1600) -> tuple[np.ndarray, tuple[float, float]]:
    """A thumbnail whose long side is about `max_side` px, and its level-0 px per px (x, y)."""
    return thumbnail(slide, max(slide.dimensions) * slide.mpp / max_side)


def tiling_overview(slide: Slide, tissue: TissueMask, coords: np.ndarray, patch_size_level0: float,
                    out: str | Path, max_side: int = 1600, title: str | None = None) -> Path:
    """Write a PNG: a thumbnail, the tissue contour in green, kept tiles outlined in blue."""
    import cv2

    img, ds = overview_image(slide, max_side)
    img = np.ascontiguousarray(img)
    canvas = img.copy()
    # level-0 px -> canvas px
    sx, sy = 1 / ds[0], 1 / ds[1]
    if len(coords):
        x0 = np.round(coords[:, 0] * sx).astype(np.int32)
        y0 = np.round(coords[:, 1] * sy).astype(np.int32)
        x1 = np.round((coords[:, 0] + patch_size_level0) * sx).astype(np.int32) - 1
        y1 = np.round((coords[:, 1] + patch_size_level0) * sy).astype(np.int32) - 1
        for a, b, c, d in zip(x0, y0, np.maximum(x1, x0), np.maximum(y1, y0)):
            cv2.rectangle(canvas, (int(a), int(b)), (int(c), int(d)), TILE_RGB, 1)
        # Blend so the tissue stays visible under a dense grid.
        canvas = cv2.addWeighted(canvas, 0.6, img, 0.4, 0)
    to_canvas = np.array([tissue.downsample[0] * sx, tissue.downsample[1] * sy])
    polys = [np.round((c + 0.5) * to_canvas).astype(np.int32).reshape(-1, 1, 2) for c in contours(tissue.mask)]
    cv2.polylines(canvas, polys, True, TISSUE_RGB, max(1, round(max(canvas.shape[:2]) / 600)))
    if title:
        pad = np.full((28, canvas.shape[1], 3), 255, np.uint8)
        cv2.putText(pad, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        canvas = np.concatenate([pad, canvas], axis=0)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), canvas[..., ::-1]):
        raise OSError(f"{out}: could not write the PNG")
    return out
