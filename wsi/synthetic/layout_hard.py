"""The hard slide layout (`wsi synth --preset hard`): small tumour fractions, isolated tumour-cell
clusters, inflammation rims at tumour margins (and patches elsewhere), benign mimics.

The easy layout, and what both share (tissue masks, polygons, placement regions), is in layout.py.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from skimage import filters, measure, morphology

from .layout import (_HI, _LAYOUT_MIN_PX, _LAYOUT_UM_FINE, _Layout, _ellipse_radius, _info, _placement,
                     _polygon, _smooth_noise, _tissue_mask, _tumor_masks)
from .textures import INFLAMMATION_TEXTURE, MIMIC_TEXTURES

logger = logging.getLogger(__name__)


def _blob(rng: np.random.Generator, allowed: np.ndarray, area: float, noise: np.ndarray) -> np.ndarray | None:
    """One connected noise-deformed ellipse of about ``area`` px inside ``allowed`` (None if none fits)."""
    candidates = np.flatnonzero(allowed)
    if candidates.size == 0:
        return None
    best, best_err = None, math.inf
    radius = math.sqrt(max(area, 1.0) / math.pi)
    for _attempt in range(30):
        aspect = rng.uniform(1.0, 1.8)
        cy, cx = np.unravel_index(candidates[rng.integers(candidates.size)], allowed.shape)
        a, b = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
        # Only the neighbourhood matters: evaluate the ellipse on a window around its centre.
        r_win = int(math.ceil(1.6 * a)) + 2
        y0, y1 = max(0, cy - r_win), min(allowed.shape[0], cy + r_win + 1)
        x0, x1 = max(0, cx - r_win), min(allowed.shape[1], cx + r_win + 1)
        r = _ellipse_radius((y1 - y0, x1 - x0), cy - y0, cx - x0, a, b, rng.uniform(0, math.pi))
        win = ((1.0 - r + noise[y0:y1, x0:x1] * min(1.0, radius / 4.0)) > 0) & allowed[y0:y1, x0:x1]
        labels = measure.label(win)
        if labels.max() == 0:
            continue
        lab = labels[cy - y0, cx - x0] or 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        blob = np.zeros(allowed.shape, bool)
        blob[y0:y1, x0:x1] = labels == lab
        err = abs(math.log(blob.sum() / area))
        if best is None or err < best_err:
            best, best_err = blob, err
        if err < math.log(1.25):
            break
    return best


def _soft(blob: np.ndarray) -> np.ndarray:
    return filters.gaussian(blob.astype(np.float32), sigma=1.0, preserve_range=True).astype(np.float32)


def _rims(rng: np.random.Generator, blob: np.ndarray, width_px: float, allowed: np.ndarray) -> list[np.ndarray]:
    """An inflammatory rim on part of a tumour blob's margin: an arc of the ring around it."""
    outer = morphology.isotropic_dilation(blob, 1.0 + width_px)
    ring = outer & ~morphology.isotropic_dilation(blob, 1.0) & allowed
    yy, xx = np.nonzero(blob)
    cy, cx = yy.mean(), xx.mean()
    ry, rx = np.nonzero(ring)
    if ry.size == 0:
        return []
    angle = np.arctan2(ry - cy, rx - cx)
    centre, half = rng.uniform(-math.pi, math.pi), rng.uniform(math.radians(50), math.radians(150))
    keep = np.abs((angle - centre + math.pi) % (2 * math.pi) - math.pi) < half
    arc = np.zeros_like(ring)
    arc[ry[keep], rx[keep]] = True
    labels = measure.label(arc)
    counts = np.bincount(labels.ravel())
    return [labels == k for k in range(1, len(counts)) if counts[k] >= 6]


def make_layout_hard(rng: np.random.Generator, width: int, height: int, mpp: float, n_tumor: int,
                      spec) -> _Layout:
    ds = max(1, min(round(_LAYOUT_UM_FINE / mpp), max(width, height) // _LAYOUT_MIN_PX))
    shape = (math.ceil(height / ds), math.ceil(width / ds))
    um = ds * mpp  # µm per layout px
    extra_rng = np.random.default_rng(spec.seed)
    tissue_bin = _tissue_mask(rng, shape)
    tissue = filters.gaussian(tissue_bin.astype(np.float32), sigma=1.5, preserve_range=True).astype(np.float32)
    inner = tissue_bin & (tissue > _HI)
    r_ref = math.sqrt(shape[0] * shape[1])
    eroded = morphology.isotropic_erosion(inner, max(3.0, 0.02 * r_ref))
    tissue_area = float(tissue_bin.sum())
    noise = 0.2 * _smooth_noise(extra_rng, shape, n_ctrl=12)
    taken = np.zeros(shape, bool)  # placed regions, dilated by a gap

    def place(area_px: float, allowed: np.ndarray, gap_px: float) -> np.ndarray | None:
        nonlocal taken
        blob = _blob(extra_rng, allowed & ~taken, area_px, noise)
        if blob is None or blob.sum() < 4:
            return None
        taken |= morphology.isotropic_dilation(blob, gap_px)
        return blob

    # Tumour regions, then clusters (tumour slides only).
    tumor_blobs: list[tuple[str, np.ndarray]] = []
    regions: list[np.ndarray] = []
    clusters: list[np.ndarray] = []
    if n_tumor > 0:
        if spec.tumor_fraction is None:
            min_px = min(6 * (128.0 / um) ** 2, 0.08 * tissue_area)
            regions = _tumor_masks(extra_rng, inner, n_tumor, min_px)
            for b in regions:
                taken |= morphology.isotropic_dilation(b, 6.0)
        # Clusters first: the tumour fraction, when given, covers them and the regions share the rest.
        # With a tumour fraction, clusters take at most half of it (small slides: fewer or smaller clusters).
        budget = math.inf if spec.tumor_fraction is None else 0.5 * spec.tumor_fraction * tissue_area
        for _ in range(spec.n_clusters):
            diameter = extra_rng.uniform(50.0, 200.0) / um
            area = min(max(math.pi * (diameter / 2) ** 2, 9.0), budget)  # at least ~3 layout px across
            if area < 9.0:
                break
            b = place(area, eroded, max(4.0, 300.0 / um))
            budget -= 0.0 if b is None else float(b.sum())
            if b is not None:
                clusters.append(b)
        if spec.tumor_fraction is not None:
            rest = spec.tumor_fraction * tissue_area - sum(float(b.sum()) for b in clusters)
            rest = max(rest, 0.5 * spec.tumor_fraction * tissue_area)
            for share in extra_rng.dirichlet(np.full(n_tumor, 2.0)):
                b = place(rest * share, eroded, 6.0)
                if b is not None:
                    regions.append(b)
            if len(regions) < n_tumor:
                logger.warning("could place only %d of %d tumor regions", len(regions), n_tumor)
        for b in regions + clusters:
            tumor_blobs.append((str(spec.tumor_textures[extra_rng.integers(len(spec.tumor_textures))]), b))
    tumor_any = np.zeros(shape, bool)
    for _, b in tumor_blobs:
        tumor_any |= b

    # Inflammation: rims on tumour margins, patches away from tumour.
    inflammation: list[tuple[str, np.ndarray]] = []
    for _, b in tumor_blobs:
        if extra_rng.random() < spec.inflammation:
            width_px = max(2.0, extra_rng.uniform(40.0, 150.0) / um)
            for arc in _rims(extra_rng, b, width_px, inner & ~morphology.isotropic_dilation(tumor_any & ~b, 2.0)):
                inflammation.append(("margin", arc))
                taken |= morphology.isotropic_dilation(arc, 2.0)
    for _ in range(spec.n_inflammation):
        area = extra_rng.uniform(0.005, 0.02) * tissue_area
        for away_um in (500.0, 250.0):  # away from tumour; closer only where the tissue is small
            b = place(area, eroded & ~morphology.isotropic_dilation(tumor_any, max(4.0, away_um / um)), 4.0)
            if b is not None:
                inflammation.append(("elsewhere", b))
                break
        else:
            logger.debug("no room for an inflammation patch away from tumour")

    # Benign mimics: anywhere in tissue not taken, either class.
    mimics: list[tuple[str, np.ndarray]] = []
    for _ in range(spec.n_mimics):
        b = place(extra_rng.uniform(0.01, 0.04) * tissue_area, eroded, 4.0)
        if b is not None:
            mimics.append((str(MIMIC_TEXTURES[extra_rng.integers(len(MIMIC_TEXTURES))]), b))

    overlays: list[tuple[str, np.ndarray]] = []
    extra: list[tuple[str, np.ndarray]] = []

    def add(name: str, blobs: list[np.ndarray]) -> list[np.ndarray]:
        fields = [_soft(b) for b in blobs]
        fields = [f for f in fields if f.max() > 0.5]
        if fields:
            overlays.append((name, np.maximum.reduce(fields)))
        return [_polygon(f, ds) for f in fields]

    extra += [("Inflammation", p) for p in add(INFLAMMATION_TEXTURE, [b for _, b in inflammation])]
    for name in MIMIC_TEXTURES:
        extra += [("Mimic", p) for p in add(name, [b for n, b in mimics if n == name])]
    polygons: list[np.ndarray] = []
    tumor_fields = []
    for name in dict.fromkeys(n for n, _ in tumor_blobs):
        blobs = [b for n, b in tumor_blobs if n == name]
        polygons += add(name, blobs)
        tumor_fields.append(overlays[-1][1])
    tumor = np.maximum.reduce(tumor_fields) if tumor_fields else None

    info = _info(tumor_blobs, len(regions), len(clusters), inflammation, mimics, tissue_area)

    return _Layout(
        ds=ds,
        tissue=tissue,
        tumor=tumor,
        polygons=polygons,
        **_placement(rng, width, height, mpp),
        overlays=overlays,
        extra=extra,
        info=info,
    )
