"""Slide layout: tissue / tumor masks on a coarse grid, tumor polygons, texture placement regions."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from skimage import filters, measure, morphology, transform

from .textures import _NORMAL_TEXTURES, _TUMOR_TEXTURE

logger = logging.getLogger(__name__)

_LAYOUT_UM = 32.0  # µm per layout pixel, at most
_LAYOUT_UM_FINE = 16.0  # ... when a slide has small regions (clusters, rims, small tumour fractions)
_LAYOUT_MIN_PX = 256  # long side of the layout grid, at least (small slides)
_CELL_UM = 512.0  # mean size of a texture-placement region (Voronoi cell)
_EDGE_SHARPNESS = 8.0  # slope of alpha vs. mask value around the 0.5 contour

# Alpha is exactly 0 below _LO and exactly 1 above _HI; tiles whose mask
# footprint stays on one side skip blending entirely.
_LO = 0.5 - 0.5 / _EDGE_SHARPNESS
_HI = 0.5 + 0.5 / _EDGE_SHARPNESS


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
    # Textured regions over the normal tissue, drawn in this order: (texture name, soft field).
    overlays: list[tuple[str, np.ndarray]] = field(default_factory=list)
    extra: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (class, level-0 ring): not tumour
    info: dict = field(default_factory=dict)  # what was placed, for the cohort's record


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


def _make_layout(rng: np.random.Generator, width: int, height: int, mpp: float, n_tumor: int,
                 spec=None) -> _Layout:
    """The slide's layout; ``spec`` (a `difficulty.SlideSpec` that changes the layout) adds the hard parts."""
    if spec is not None and spec.changes_layout:
        from .layout_hard import make_layout_hard

        return make_layout_hard(rng, width, height, mpp, n_tumor, spec)
    ds = max(1, min(round(_LAYOUT_UM / mpp), max(width, height) // _LAYOUT_MIN_PX))
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    sigma = 1.5  # layout px; smooths the binary staircase into a soft edge
    tissue_bin = _tissue_mask(rng, shape)
    tissue = filters.gaussian(tissue_bin.astype(np.float32), sigma=sigma, preserve_range=True).astype(np.float32)

    tumor = None
    polygons: list[np.ndarray] = []
    blobs: list[np.ndarray] = []
    if n_tumor > 0:
        # "At least several 128 µm tiles", where the slide is large enough for that.
        min_px = 6 * (128.0 / (ds * mpp)) ** 2
        min_px = min(min_px, 0.08 * tissue_bin.sum())
        blobs = _tumor_masks(rng, tissue_bin & (tissue > _HI), n_tumor, min_px)
        fields = [filters.gaussian(b.astype(np.float32), sigma=1.0, preserve_range=True).astype(np.float32)
                  for b in blobs]
        polygons = [_polygon(f, ds) for f in fields]
        tumor = np.maximum.reduce(fields) if fields else None

    return _Layout(
        ds=ds,
        tissue=tissue,
        tumor=tumor,
        polygons=polygons,
        **_placement(rng, width, height, mpp),
        overlays=[] if tumor is None else [(_TUMOR_TEXTURE[0], tumor)],
        info=_info([(_TUMOR_TEXTURE[0], b) for b in blobs], len(blobs), 0, [], [], float(tissue_bin.sum())),
    )


def _placement(rng: np.random.Generator, width: int, height: int, mpp: float) -> dict:
    """Where each texture goes: the `_Layout` fields shared by the easy and the hard layout (drawn in
    this order, so a seed gives the same slide as before)."""
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
    return {"cell": cell, "seeds": seeds, "normal_tex": normal_tex,
            "normal_variant": rng.integers(0, 4, size=(gy, gx)),
            "normal_off": rng.uniform(0, 8192, size=(gy, gx, 2)),
            "tumor_variant": rng.integers(0, 4, size=(gy, gx)),
            "tumor_off": rng.uniform(0, 8192, size=(gy, gx, 2))}


def _info(tumor_blobs, n_regions: int, n_clusters: int, inflammation, mimics, tissue_area: float) -> dict:
    """What a layout holds (for the cohort's synth.json); fractions are of the tissue area."""

    def frac(blobs) -> float:
        return round(float(sum(b.sum() for b in blobs)) / max(tissue_area, 1.0), 5)

    return {
        "tumor_textures": sorted({n for n, _ in tumor_blobs}),
        "tumor_regions": n_regions,
        "clusters": n_clusters,
        "tumor_fraction": frac([b for _, b in tumor_blobs]),
        "inflammation_margin": sum(k == "margin" for k, _ in inflammation),
        "inflammation_elsewhere": sum(k == "elsewhere" for k, _ in inflammation),
        "inflammation_fraction": frac([b for _, b in inflammation]),
        "mimics": [n for n, _ in mimics],
        "mimic_fraction": frac([b for _, b in mimics]),
    }
