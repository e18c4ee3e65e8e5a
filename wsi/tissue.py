"""Tissue segmentation on a low-resolution view of the slide.

HSV saturation, median-blurred, thresholded by Otsu, capped just above the saturation of the glass
(the brightest pixels) so that pale tissue (loose stroma, IHC counterstain) survives; then morphological
closing, removal of specks below a minimum area and filling of holes below a maximum area, all
sized in µm so the result does not depend on the thumbnail's resolution. Black (scanner padding,
missing-data areas) and white backgrounds both have low saturation or low value and drop out.
Level 0 is never read for this: the coarsest pyramid level that still has enough pixels is used.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .slide import Slide


@dataclass(frozen=True)
class TissueParams:
    """Segmentation settings; areas in µm², lengths in µm (independent of the thumbnail size)."""

    seg_mpp: float = 8.0          # segment at about this resolution (µm/px) ...
    min_side_px: int = 512        # ... or finer, so the mask's long side has at least this many px
    sat_min: int = 6              # never threshold below this saturation (0-255)
    bg_margin: int = 6            # threshold at most this far above the glass's saturation
    bg_quantile: float = 0.95     # pixels brighter than this quantile of value are taken as glass
    dark_max: int = 30            # value (brightness) at or below this is black background, not tissue
    median_um: float = 16.0       # median blur width
    close_um: float = 32.0        # closing kernel width: joins fragments of one section
    min_area_um2: float = field(default=20_000.0, metadata={
        "help": "drop tissue pieces smaller than this many µm² (dust, debris)"})
    max_hole_um2: float = field(default=20_000.0, metadata={
        "help": "fill holes in tissue smaller than this many µm²; larger ones (lumens, tears) stay"})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TissueMask:
    """A binary tissue mask and where it sits: level-0 px per mask px along x and y."""

    mask: np.ndarray          # uint8 {0, 1}, (h, w)
    downsample: tuple[float, float]
    mpp: float                # µm per mask pixel
    threshold: int            # saturation threshold used

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def thumbnail(slide: Slide, mpp: float) -> tuple[np.ndarray, tuple[float, float]]:
    """An RGB view at about `mpp` µm/px (never finer than level 0), read from the coarsest level at
    most 2× coarser than that, and its level-0 px per thumbnail px (x, y)."""
    import cv2

    level = 0
    for i in range(len(slide.levels)):
        # 5 % slack: real pyramids are not exact powers (an Aperio "64x" level is often 64.01x)
        if slide.level_mpp(i) <= 2 * mpp * 1.05:
            level = i
    img = slide.read_level(level)
    f = slide.level_mpp(level) / mpp
    if f < 1:
        h, w = img.shape[:2]
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    W0, H0 = slide.dimensions
    return img, (W0 / img.shape[1], H0 / img.shape[0])


def segmentation_mpp(slide: Slide, params: TissueParams = TissueParams()) -> float:
    """The resolution tissue is segmented at for this slide."""
    long_um = max(slide.dimensions) * slide.mpp
    return max(slide.mpp, min(params.seg_mpp, long_um / params.min_side_px))


def _odd(n: float) -> int:
    n = max(1, int(round(n)))
    return n if n % 2 else n + 1


def tissue_mask_from_rgb(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> tuple[np.ndarray, int]:
    """Binary tissue mask (uint8 {0,1}) of an RGB image at `mpp` µm/px, and the threshold used."""
    import cv2

    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1], hsv[..., 2]
    k = _odd(params.median_um / mpp)
    if k > 1:
        sat = cv2.medianBlur(sat, k)
    valid = val > params.dark_max
    candidates = sat[valid]
    if candidates.size == 0:
        return np.zeros(sat.shape, np.uint8), 255
    otsu, _ = cv2.threshold(candidates.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu alone splits stained from pale tissue when there is little glass; the glass's own
    # saturation bounds it from above.
    v = val[valid]
    glass_sat = float(np.median(candidates[v >= np.quantile(v, params.bg_quantile)]))
    thr = int(max(params.sat_min, min(otsu, glass_sat + params.bg_margin)))
    mask = ((sat > thr) & valid).astype(np.uint8)

    kc = _odd(params.close_um / mpp)
    if kc > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (kc, kc)))
    px_area = mpp * mpp
    mask = _remove_small(mask, params.min_area_um2 / px_area)
    holes = _remove_small(1 - mask, params.max_hole_um2 / px_area, keep_border=True)
    return (1 - holes).astype(np.uint8), thr


def _remove_small(mask: np.ndarray, min_px: float, keep_border: bool = False) -> np.ndarray:
    """Drop 8-connected components of `mask` smaller than `min_px` (optionally keep any touching the border:
    background around the tissue is not a hole)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    if keep_border:
        x, y, w, h = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        keep |= (x == 0) | (y == 0) | (x + w == mask.shape[1]) | (y + h == mask.shape[0])
    keep[0] = False
    return keep[labels].astype(np.uint8)


def segment_tissue(slide: Slide, params: TissueParams = TissueParams()) -> TissueMask:
    """Segment the tissue of `slide` from a low-resolution level (never level 0 of a pyramid)."""
    img, ds = thumbnail(slide, segmentation_mpp(slide, params))
    mpp = slide.mpp * (ds[0] + ds[1]) / 2
    mask, thr = tissue_mask_from_rgb(img, mpp, params)
    return TissueMask(mask=mask, downsample=ds, mpp=mpp, threshold=thr)


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer and hole contours of a binary mask, as (K, 2) x,y arrays in mask pixels."""
    import cv2

    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return [c[:, 0, :] for c in cs]
