"""`mil heatmap`: a slide's predictions over its thumbnail (PNG) and as QuPath-readable GeoJSON.

For predictions/<run> of a slide it writes, into the output folder:
    <slide>_<run>_instance.png   instance score (0..1, turbo) over the thumbnail, with a colour bar
    <slide>_<run>_attention.png  attention relative to uniform, capped at its 99th percentile
    <slide>_<run>.geojson        one Polygon per tile (level-0 px) with both values as measurements
Multi-class runs (predictions with `class_scores`) also get <slide>_<run>_class_<name>.png, the
student's probability of each class, and each class's score as a GeoJSON measurement `score_<name>`.
The background is the slide's thumbnail (`SlideView.thumbnail`: from the slide file, else from the
stored tiles); when it has neither, a white canvas of the slide's shape (SlideMeta width, height).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from wsi.annotations import tiles_geojson  # the GeoJSON writer sits next to the reader

log = logging.getLogger(__name__)

ALPHA = 0.5             # overlay opacity: the tissue stays readable under the colours
ATTENTION_PCT = 99      # attention colour scale tops out here, so one hot tile does not wash out the rest
BAR_PX, TITLE_PX = 140, 36   # figure room right of the thumbnail (colour bar) and above it (title)


def slide_background(view, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The slide's thumbnail (RGB uint8; from its slide file, else its stored tiles) and its level-0 px
    per thumbnail px (x, y); a white canvas of the slide's shape (and a warning) when it has neither."""
    from wsi.errors import StoreError

    try:
        return view.thumbnail(max_side)
    except StoreError as e:
        why = str(e)
    meta = view.meta
    w, h = view.level0_size
    ds = max(w, h) / max_side
    log.warning("%s: source slide %s is missing or unreadable (%s); drawing the heatmap on a blank canvas",
                view.slide_id, meta.source, why)
    img = np.full((max(1, round(h / ds)), max(1, round(w / ds)), 3), 255, np.uint8)
    return img, (w / img.shape[1], h / img.shape[0])


def paint_tiles(shape: tuple[int, int], coords: np.ndarray, size0: float, ds: tuple[float, float],
                values: np.ndarray, vmax: float, cmap: str, alpha: float = ALPHA) -> np.ndarray:
    """RGBA float overlay of `shape` (h, w): each tile's rectangle in the colour of value/vmax; alpha 0
    between tiles. Higher values are drawn last, so they stay visible where tiles overlap."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](np.clip(np.asarray(values, np.float64) / vmax, 0, 1))
    colours[:, 3] = alpha
    over = np.zeros(tuple(shape) + (4,), np.float32)
    x0 = np.floor(coords[:, 0] / ds[0]).astype(int)
    y0 = np.floor(coords[:, 1] / ds[1]).astype(int)
    x1 = np.maximum(np.ceil((coords[:, 0] + size0) / ds[0]).astype(int), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + size0) / ds[1]).astype(int), y0 + 1)
    for i in np.argsort(values, kind="stable"):
        over[max(y0[i], 0):y1[i], max(x0[i], 0):x1[i]] = colours[i]
    return over


def _figure(base: np.ndarray, over: np.ndarray, vmax: float, cmap: str, label: str, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = base.shape[:2]
    dpi, right, top = 100, BAR_PX, TITLE_PX
    fig = plt.figure(figsize=((w + right) / dpi, (h + top) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, w / (w + right), h / (h + top)))
    ax.imshow(base, interpolation="nearest")
    ax.imshow(over, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes((w / (w + right) + 10 / (w + right), 0.1, 15 / (w + right), 0.7))
    fig.colorbar(ScalarMappable(Normalize(0, vmax), cmap), cax=cax, label=label)
    fig.suptitle(title, fontsize=9, y=1 - 8 / (h + top), va="top")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def _file_part(name: str) -> str:
    """A class name as a file-name part: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name) or "_"


def write_heatmap(store, slide_id: str, out_dir: str | Path, *, run: str, max_side: int = 2000) -> list[Path]:
    """Write <slide>_<run>_instance.png, <slide>_<run>_attention.png, (multi-class runs) one
    <slide>_<run>_class_<name>.png per class, and <slide>_<run>.geojson into out_dir from the store's
    predictions/<run> of the slide; returns the paths in that order. `store` is a TileStore or the
    path of an existing one."""
    from wsi.errors import StoreError
    from wsi.store import TileStore

    store = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
    view = store[slide_id]
    arrays, pattrs = view.predictions(run)
    coords = view.coords
    size0 = view.meta.tile_size_level0
    if not size0:
        raise StoreError(f"{store.path}: slide {slide_id!r} records no tile size at level 0, so its tiles cannot "
                         "be drawn; re-import it (`wsi import-h5 --overwrite`) from h5 files that record the patch "
                         "size (TRIDENT coords attrs, or CLAM's patches/ folder)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, ds = slide_background(view, max_side)

    classes = list(pattrs.get("class_names") or [])
    probs = list(pattrs.get("bag_probs") or [])
    pos = pattrs.get("positive_class") or pattrs.get("predicted_class")
    p_pos = f"{probs[classes.index(pos)]:.3f}" if pos in classes and len(probs) == len(classes) else "?"
    title = (f"{slide_id} | {run} ({pattrs.get('model')}{' + w2s' if pattrs.get('w2s') else ''}) | "
             f"p({pos}) = {p_pos} | predicted: {pattrs.get('predicted_class')}")
    score, att = arrays["instance_score"], arrays["attention"]
    att_max = float(np.percentile(att, ATTENTION_PCT)) if len(att) else 1.0
    att_max = att_max if att_max > 1e-6 else max(float(att.max(initial=0)), 1.0)
    paths = []
    for key, values, vmax, cmap, label in (
            ("instance", score, 1.0, "turbo", f"instance score p({pos})"),
            ("attention", att, att_max, "turbo", f"attention (1 = uniform; capped at p{ATTENTION_PCT})")):
        over = paint_tiles(base.shape[:2], coords, size0, ds, values, vmax, cmap)
        paths.append(_figure(base, over, vmax, cmap, label, title, out / f"{slide_id}_{run}_{key}.png"))
    measures = {"instance_score": score, "attention": att}
    per_class = arrays.get("class_scores")
    if per_class is not None and per_class.ndim == 2 and per_class.shape[1] == len(classes):
        for c, name in enumerate(classes):
            over = paint_tiles(base.shape[:2], coords, size0, ds, per_class[:, c], 1.0, "turbo")
            paths.append(_figure(base, over, 1.0, "turbo", f"instance score p({name})", title,
                                 out / f"{slide_id}_{run}_class_{_file_part(name)}.png"))
            measures[f"score_{name}"] = per_class[:, c]
    gj = out / f"{slide_id}_{run}.geojson"
    gj.write_text(json.dumps(tiles_geojson(coords, size0, measures), separators=(",", ":")))
    paths.append(gj)
    return paths
