"""`mil heatmap`: a slide's predictions over its thumbnail (PNG) and as QuPath-readable GeoJSON."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _background(attrs: dict, slide_id: str, max_side: int) -> tuple[np.ndarray, float]:
    """The slide thumbnail (RGB) and its level-0 px per thumbnail px; white when the slide is gone."""
    from wsi.slide import SlideError, open_slide
    from wsi.viz import overview_image

    src = attrs.get("source")
    try:
        given = attrs.get("slide_mpp") if attrs.get("slide_mpp_source") == "given" else None
        with open_slide(src, given) as slide:
            img, ds = overview_image(slide, max_side)
            return np.ascontiguousarray(img), float(ds[0])
    except (SlideError, OSError, TypeError) as e:
        w, h = attrs.get("level0_size") or [attrs.get("width", 1), attrs.get("height", 1)]
        ds = max(w, h) / max_side
        log.warning("%s: slide file %s cannot be opened (%s); drawing on a blank canvas", slide_id, src, e)
        return np.full((max(1, int(h / ds)), max(1, int(w / ds)), 3), 255, np.uint8), ds


def _paint(base: np.ndarray, coords: np.ndarray, size0: float, ds: float, values: np.ndarray,
           vmax: float, cmap: str) -> np.ndarray:
    """RGBA overlay: each tile's rectangle in the colour of its value (alpha 0 between tiles)."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(values / vmax, 0, 1))
    over = np.zeros(base.shape[:2] + (4,), np.float32)
    x0 = np.floor(coords[:, 0] / ds).astype(int)
    y0 = np.floor(coords[:, 1] / ds).astype(int)
    side = max(1, int(round(size0 / ds)))
    for i in np.argsort(values):            # the highest values are drawn last, on top
        over[y0[i]:y0[i] + side, x0[i]:x0[i] + side] = colours[i]
    over[..., 3] *= 0.55
    return over


def _figure(base: np.ndarray, over: np.ndarray, vmax: float, cmap: str, label: str, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = base.shape[:2]
    dpi = 100
    fig = plt.figure(figsize=(w / dpi + 1.4, h / dpi + 0.6), dpi=dpi)
    ax = fig.add_axes([0, 0, w / (w + 140), h / (h + 60)])
    ax.imshow(base)
    ax.imshow(over)
    ax.set_axis_off()
    cax = fig.add_axes([w / (w + 140) + 0.01, 0.1, 0.02, 0.7])
    fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap), cax=cax, label=label)
    fig.suptitle(title, fontsize=10, y=0.995)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def tiles_geojson(coords: np.ndarray, size0: float, measurements: dict[str, np.ndarray]) -> dict:
    """Tiles as QuPath 'tile' objects (level-0 polygons) with their measurements."""
    s = int(round(size0))
    feats = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "tile", "name": f"tile {i}",
                                     "measurements": {k: round(float(v[i]), 4) for k, v in measurements.items()}}})
    return {"type": "FeatureCollection", "features": feats}


def write_heatmap(store, slide_id: str, out_dir: str | Path, *, run: str, max_side: int = 2000) -> list[Path]:
    """Write <slide>_<run>_instance.png, <slide>_<run>_attention.png and <slide>_<run>.geojson into out_dir."""
    from wsi.annotations import tile_size_level0
    from wsi.store import TileStore

    store = store if isinstance(store, TileStore) else TileStore(store, mode="r")
    arrays, pattrs = store.predictions(slide_id, run)
    attrs = dict(store.slide(slide_id).attrs)
    coords = store.coords(slide_id)
    size0 = tile_size_level0(attrs, slide_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, ds = _background(attrs, slide_id, max_side)
    probs = pattrs.get("bag_probs") or []
    pos = pattrs.get("positive_class") or pattrs.get("predicted_class")
    classes = pattrs.get("class_names") or []
    p_pos = probs[classes.index(pos)] if pos in classes and probs else float("nan")
    head = f"{slide_id} · {run} ({pattrs.get('model')}{' + w2s' if pattrs.get('w2s') else ''}) · " \
           f"p({pos}) = {p_pos:.3f} · predicted {pattrs.get('predicted_class')}"
    paths = []
    score, att = arrays["instance_score"], arrays["attention"]
    vmax_att = float(np.percentile(att, 99)) if len(att) else 1.0
    for key, values, vmax, cmap, label in (
            ("instance", score, 1.0, "turbo", f"instance score: p({pos})"),
            ("attention", att, max(vmax_att, 1e-6), "inferno", "attention (1 = uniform; capped at the 99th pct)")):
        over = _paint(base, coords, size0, ds, values, vmax, cmap)
        paths.append(_figure(base, over, vmax, cmap, label, head, out / f"{slide_id}_{run}_{key}.png"))
    gj = out / f"{slide_id}_{run}.geojson"
    gj.write_text(json.dumps(tiles_geojson(coords, size0, {"instance_score": score, "attention": att})))
    paths.append(gj)
    return paths
