"""Region annotations (QuPath GeoJSON, ASAP / Camelyon16 XML) into per-tile labels in the store.

A tile's label is the fraction of its area inside the annotated regions: the union of the included
regions, minus their holes, minus exclusion regions (Camelyon16 group `_2`: non-tumor inside
tumor). A tile is positive when that fraction is > `POSITIVE_FRACTION` (0.5). Coordinates are
level-0 pixels, the convention of QuPath exports, ASAP and the store's `coords`.

Fractions come from a rasterisation at >= 16 px per tile side: a pixel counts when its centre is
inside (the usual scan-line rule, so a square covering half a tile gives exactly 0.5), and one
summed-area table answers every tile at once. Only the bounding box where tiles and regions meet
is rasterised, a strip of rows at a time, so memory stays bounded on any slide.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .store import COMPLETE, StoreError, TileStore, slide_id_from_path, validate_slide_id
from .tiling import box_sums

log = logging.getLogger(__name__)

POSITIVE_FRACTION = 0.5
PX_PER_TILE = 16                 # raster pixels along a tile side, at least
MAX_CANVAS_PX = 256_000_000      # beyond this the raster gets coarser (fewer px per tile)
STRIP_PX = 4_000_000             # raster pixels held at once
EXCLUSION_CLASSES = frozenset({"_2", "exclusion"})   # subtracted from the included regions
IGNORED_PREFIXES = ("ignore", "region")             # QuPath's "Ignore*" and "Region*": unused by default
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
_AREA_TYPES_ASAP = {"polygon", "spline", "rectangle"}
_NO_AREA_GEOMETRIES = {"Point", "MultiPoint", "LineString", "MultiLineString"}


class AnnotationError(ValueError):
    """An annotation file that cannot be read; the message names the file and what is wrong."""


@dataclass(eq=False)
class Region:
    """One annotated polygon in level-0 px."""

    name: str                    # class (QuPath classification or name; ASAP PartOfGroup)
    exterior: np.ndarray         # (K, 2) float64 x, y
    holes: tuple[np.ndarray, ...] = ()
    exclude: bool = False        # an exclusion: subtracted from the union of included regions

    def area(self) -> float:
        """Shoelace area of the exterior minus the holes (level-0 px²)."""
        return _ring_area(self.exterior) - sum(_ring_area(h) for h in self.holes)


def _ring_area(r: np.ndarray) -> float:
    x, y = r[:, 0], r[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


def is_exclusion(name: str) -> bool:
    return name.strip().lower() in EXCLUSION_CLASSES


# ---- reading -------------------------------------------------------------------------------------
def read_annotations(path: str | Path) -> list[Region]:
    """Regions of a QuPath GeoJSON (.geojson/.json) or ASAP XML (.xml) file; other suffixes are sniffed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise AnnotationError(f"{path}: not a text file; expected QuPath GeoJSON or ASAP XML") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read it ({e.strerror or e})") from None
    suffix = path.suffix.lower()
    if suffix == ".xml" or (suffix not in (".geojson", ".json") and text.lstrip().startswith("<")):
        return parse_asap_xml(text, path)
    return parse_geojson(text, path)


def parse_geojson(text: str, path: str | Path = "<geojson>") -> list[Region]:
    """QuPath GeoJSON: a FeatureCollection, a bare list of Features (QuPath's export), or one Feature.

    Only annotation objects are used (`objectType` absent or "annotation"): detections, cells and
    tiles are skipped. The class is `properties.classification.name`, else `properties.name`, else "".
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: FeatureCollection without a 'features' list")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict) and doc.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        what = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise AnnotationError(f"{path}: expected a GeoJSON FeatureCollection, Feature or list of Features, "
                              f"got {what!r}")
    regions: list[Region] = []
    skipped = 0
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise AnnotationError(f"{path}: item {i} is not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{path}: feature {i}: 'properties' is not an object")
        obj = props.get("objectType", feat.get("objectType"))
        if obj not in (None, "annotation"):
            skipped += 1
            continue
        name = _class_name(props)
        for ext, holes in _polygons(feat.get("geometry"), f"{path}: feature {i}"):
            regions.append(Region(name, ext, holes, is_exclusion(name)))
    if skipped:
        log.debug("%s: skipped %d objects that are not annotations (detections, cells, tiles)", path, skipped)
    return regions


def _class_name(props: dict) -> str:
    c = props.get("classification")
    if isinstance(c, dict) and isinstance(c.get("name"), str):
        return c["name"]
    if isinstance(c, str):
        return c
    return props["name"] if isinstance(props.get("name"), str) else ""


def _polygons(geom, where: str) -> list[tuple[np.ndarray, tuple[np.ndarray, ...]]]:
    """(exterior, holes) of every polygon in a GeoJSON geometry."""
    if geom is None:
        return []
    if not isinstance(geom, dict):
        raise AnnotationError(f"{where}: 'geometry' is not an object")
    kind = geom.get("type")
    if kind == "GeometryCollection":
        return [p for g in geom.get("geometries") or [] for p in _polygons(g, where)]
    if kind in _NO_AREA_GEOMETRIES:
        return []
    coords = geom.get("coordinates")
    if kind == "Polygon":
        polys = [coords]
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise AnnotationError(f"{where}: MultiPolygon coordinates must be a list of polygons")
        polys = coords
    else:
        raise AnnotationError(f"{where}: unsupported geometry type {kind!r} (expected Polygon or MultiPolygon)")
    out = []
    for poly in polys:
        if not isinstance(poly, list) or not poly:
            raise AnnotationError(f"{where}: {kind} coordinates must be lists of rings of [x, y] points")
        rings = [_ring(r, where) for r in poly]
        if rings[0] is not None:
            out.append((rings[0], tuple(r for r in rings[1:] if r is not None)))
    return out


def _ring(points, where: str) -> np.ndarray | None:
    """A (K, 2) float ring, or None when it has no area (fewer than 3 points)."""
    try:
        a = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 2 or a.shape[1] < 2:
        raise AnnotationError(f"{where}: a ring is not a list of [x, y] points")
    a = a[:, :2]
    if not np.isfinite(a).all():
        raise AnnotationError(f"{where}: a ring has non-finite coordinates")
    return a if len(a) >= 3 else None


def parse_asap_xml(text: str, path: str | Path = "<xml>") -> list[Region]:
    """ASAP XML (Camelyon16/17). The class is the annotation's `PartOfGroup`; groups `_2` and
    `Exclusion` are exclusions. Polygon, Spline (its control points, as Camelyon's own evaluation
    reads them) and Rectangle annotations have an area; dots and point sets are skipped."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not valid XML ({e})") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: not an ASAP annotation file (root element <{root.tag}>, "
                              "expected <ASAP_Annotations>)")
    regions = []
    for i, ann in enumerate(root.iter("Annotation")):
        label = ann.get("Name") or f"#{i}"
        if (ann.get("Type") or "polygon").lower() not in _AREA_TYPES_ASAP:
            continue
        pts = []
        for c in ann.iter("Coordinate"):
            try:
                # Some Camelyon files write decimal commas.
                pts.append((float(c.get("Order", len(pts))), float(c.get("X").replace(",", ".")),
                            float(c.get("Y").replace(",", "."))))
            except (AttributeError, TypeError, ValueError):
                raise AnnotationError(f"{path}: annotation {label!r}: a Coordinate without numeric "
                                      f"X and Y ({dict(c.attrib)})") from None
        pts.sort(key=lambda p: p[0])
        ring = np.array([p[1:] for p in pts], np.float64).reshape(-1, 2)
        if not np.isfinite(ring).all():
            raise AnnotationError(f"{path}: annotation {label!r} has non-finite coordinates")
        if ann.get("Type", "").lower() == "rectangle" and len(ring) == 2:  # two opposite corners
            (x0, y0), (x1, y1) = ring
            ring = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        if len(ring) < 3:
            continue
        group = ann.get("PartOfGroup") or ""
        regions.append(Region(group, ring, (), is_exclusion(group)))
    return regions


def select_regions(regions: list[Region], classes: list[str] | None = None) -> list[Region]:
    """The regions that label tiles: exclusions always, plus the chosen classes.

    `classes=None`: every class except exclusions and QuPath's "Ignore*" / "Region*". Otherwise the
    named classes (case-insensitive).
    """
    if classes is None:
        keep = lambda n: not n.strip().lower().startswith(IGNORED_PREFIXES)  # noqa: E731
    else:
        wanted = {c.strip().lower() for c in classes}
        keep = lambda n: n.strip().lower() in wanted  # noqa: E731
    return [r for r in regions if r.exclude or keep(r.name)]


# ---- fractions -----------------------------------------------------------------------------------
def tile_fractions(regions: list[Region], coords: np.ndarray, tile_size_level0: float) -> np.ndarray:
    """(N,) float32 fraction of each tile (level-0 top-left `coords`, side `tile_size_level0`) inside
    the union of the non-exclusion `regions` minus their holes and minus every exclusion region."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if not tile_size_level0 > 0:
        raise ValueError(f"tile size must be positive, got {tile_size_level0}")
    out = np.zeros(len(coords), np.float32)
    incl = [r for r in regions if not r.exclude]
    if not len(coords) or not incl:
        return out
    excl = [r for r in regions if r.exclude]
    size = float(tile_size_level0)
    ox, oy = coords.min(0)                  # the raster grid is aligned with the tile grid
    tx1, ty1 = coords.max(0) + size
    pts = np.concatenate([r.exterior for r in incl])
    rx0, ry0 = pts.min(0)
    rx1, ry1 = pts.max(0)
    ds = size / PX_PER_TILE
    while True:
        c_lo, r_lo = max(0, math.floor((rx0 - ox) / ds)), max(0, math.floor((ry0 - oy) / ds))
        c_hi = min(math.ceil((tx1 - ox) / ds), math.ceil((rx1 - ox) / ds))
        r_hi = min(math.ceil((ty1 - oy) / ds), math.ceil((ry1 - oy) / ds))
        W, H = c_hi - c_lo, r_hi - r_lo
        if W <= 0 or H <= 0:
            return out                      # no tile meets a region
        if W * H <= MAX_CANVAS_PX:
            break
        ds *= math.sqrt(W * H / MAX_CANVAS_PX) * 1.01

    def to_px(ring: np.ndarray) -> np.ndarray:
        return np.stack([(ring[:, 0] - ox) / ds - c_lo, (ring[:, 1] - oy) / ds - r_lo], 1)

    spans_in = _spans([[to_px(r.exterior), *map(to_px, r.holes)] for r in incl], W, H)
    spans_ex = _spans([[to_px(r.exterior), *map(to_px, r.holes)] for r in excl], W, H)
    # Tile boxes in raster px; the full tile area is the denominator even where the raster is clipped.
    c0 = np.round((coords[:, 0] - ox) / ds).astype(np.int64) - c_lo
    r0 = np.round((coords[:, 1] - oy) / ds).astype(np.int64) - r_lo
    c1 = np.maximum(np.round((coords[:, 0] + size - ox) / ds).astype(np.int64) - c_lo, c0 + 1)
    r1 = np.maximum(np.round((coords[:, 1] + size - oy) / ds).astype(np.int64) - r_lo, r0 + 1)
    area = (c1 - c0) * (r1 - r0)
    inside = np.zeros(len(coords), np.int64)
    cc0, cc1 = np.clip(c0, 0, W), np.clip(c1, 0, W)
    step = max(1, STRIP_PX // W)
    for s0 in range(0, H, step):
        s1 = min(H, s0 + step)
        mask = _paint(spans_in, s0, s1, W) > 0
        if spans_ex[0].size:
            mask &= _paint(spans_ex, s0, s1, W) == 0
        inside += box_sums(mask, cc0, np.clip(r0 - s0, 0, s1 - s0), cc1, np.clip(r1 - s0, 0, s1 - s0))
    np.divide(inside, area, out=out, casting="unsafe")
    return out


def _spans(polygons: list[list[np.ndarray]], W: int, H: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan-line spans (row, first col, end col) of each polygon (rings in raster px, even-odd within
    a polygon), sorted by row. A pixel (i, j) is inside when its centre (j + .5, i + .5) is."""
    rows_all, c0_all, c1_all = [], [], []
    for rings in polygons:
        x0 = np.concatenate([r[:, 0] for r in rings])
        y0 = np.concatenate([r[:, 1] for r in rings])
        x1 = np.concatenate([np.roll(r[:, 0], -1) for r in rings])   # each ring closes on itself
        y1 = np.concatenate([np.roll(r[:, 1], -1) for r in rings])
        lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows whose centre lies in [lo, hi): half-open, so a vertex is crossed once, and every
        # row crosses a closed ring an even number of times.
        first = np.clip(np.ceil(lo - 0.5), 0, H).astype(np.int64)
        end = np.clip(np.ceil(hi - 0.5), 0, H).astype(np.int64)
        n = end - first
        keep = n > 0
        if not keep.any():
            continue
        x0, y0, x1, y1, first, n = x0[keep], y0[keep], x1[keep], y1[keep], first[keep], n[keep]
        e = np.repeat(np.arange(len(n)), n)
        rows = first[e] + np.arange(len(e)) - np.repeat(np.cumsum(n) - n, n)
        x = x0[e] + (rows + 0.5 - y0[e]) * (x1[e] - x0[e]) / (y1[e] - y0[e])
        order = np.lexsort((x, rows))
        rows, x = rows[order], x[order]
        c0 = np.clip(np.ceil(x[0::2] - 0.5), 0, W).astype(np.int64)
        c1 = np.clip(np.ceil(x[1::2] - 0.5), 0, W).astype(np.int64)
        ok = c1 > c0
        rows_all.append(rows[0::2][ok])
        c0_all.append(c0[ok])
        c1_all.append(c1[ok])
    if not rows_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, c0, c1 = np.concatenate(rows_all), np.concatenate(c0_all), np.concatenate(c1_all)
    order = np.argsort(rows, kind="stable")
    return rows[order], c0[order], c1[order]


def _paint(spans: tuple[np.ndarray, np.ndarray, np.ndarray], s0: int, s1: int, W: int) -> np.ndarray:
    """How many polygons cover each pixel of rows [s0, s1): (s1 - s0, W) int32."""
    rows, c0, c1 = spans
    a, b = np.searchsorted(rows, [s0, s1])
    diff = np.zeros((s1 - s0, W + 1), np.int32)
    np.add.at(diff, (rows[a:b] - s0, c0[a:b]), 1)
    np.add.at(diff, (rows[a:b] - s0, c1[a:b]), -1)
    return np.cumsum(diff[:, :W], axis=1, out=diff[:, :W])


# ---- the store -----------------------------------------------------------------------------------
@dataclass
class LabelResult:
    slide_id: str
    status: str                  # labelled (from a file) | negative (no file: all 0) | skipped | failed
    n_tiles: int = 0
    n_positive: int = 0
    source: str | None = None    # the annotation file
    error: str | None = None
    seconds: float = 0.0


def annotation_files(paths: str | Path | list) -> list[Path]:
    """Annotation files from files and folders (a folder: its *.geojson, *.json, *.xml)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in ANNOTATION_SUFFIXES and not f.name.startswith("."))
            if not found:
                log.warning("%s: no annotation files (%s) in this folder", p, ", ".join(ANNOTATION_SUFFIXES))
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise AnnotationError(f"{p}: no such file or folder; give annotation files or a folder of them")
    return files


def _match(files: list[Path], slide_ids: set[str]) -> tuple[dict[str, list[Path]], list[Path]]:
    """Files by slide id (from the file name: `tumor_001.xml`, also `tumor_001.svs.geojson`)."""
    by_slide: dict[str, list[Path]] = {}
    unmatched = []
    for f in files:
        ids = []
        for name in (f.name, Path(f.name).stem):
            try:
                ids.append(slide_id_from_path(name))
            except ValueError:
                pass
        sid = next((i for i in ids if i in slide_ids), None)
        if sid is None:
            unmatched.append(f)
        else:
            by_slide.setdefault(sid, []).append(f)
    return by_slide, unmatched


def tile_size_level0(attrs: dict, slide_id: str) -> float:
    """A slide's tile side in level-0 px, from the store's attributes."""
    if attrs.get("patch_size_level0"):
        return float(attrs["patch_size_level0"])
    ps, mpp, smpp = attrs.get("patch_size"), attrs.get("mpp"), attrs.get("slide_mpp")
    if ps and mpp and smpp:
        return float(ps) * float(mpp) / float(smpp)
    raise StoreError(f"slide {slide_id!r}: the store does not record its tile size at level 0 "
                     "(patch_size_level0, or patch_size with mpp and slide_mpp); tile it again with `wsi tile`")


def label_slide(store: TileStore, slide_id: str, path: Path | None, *, name: str = "tumor",
                classes: list[str] | None = None) -> LabelResult:
    """Label one slide's tiles from one annotation file (None: all negative) and write them."""
    t0 = time.perf_counter()
    coords = store.coords(slide_id)
    attrs = {"source": str(path) if path else None, "selected_classes": list(classes) if classes else None,
             "rule": f"positive if fraction > {POSITIVE_FRACTION}", "positive_fraction": POSITIVE_FRACTION}
    if path is None:
        values = np.zeros(len(coords), np.float32)
        attrs |= {"classes": [], "n_regions": 0, "n_exclusions": 0}
    else:
        found = read_annotations(path)
        regions = select_regions(found, classes)
        used = sorted({r.name for r in regions if not r.exclude})
        if found and not used:
            have = sorted({r.name for r in found}) or ["none"]
            log.warning("%s: no region of the chosen classes (%s); it has: %s", path,
                        ", ".join(classes) if classes else "default", ", ".join(have))
        size = tile_size_level0(dict(store.slide(slide_id).attrs), slide_id)
        values = tile_fractions(regions, coords, size)
        attrs |= {"classes": used, "n_regions": sum(not r.exclude for r in regions),
                  "n_exclusions": sum(r.exclude for r in regions), "tile_size_level0": size}
    n_pos = int((values > POSITIVE_FRACTION).sum())
    store.write_labels(slide_id, name, values, attrs | {"n_positive": n_pos})
    return LabelResult(slide_id, "labelled" if path else "negative", len(values), n_pos,
                       str(path) if path else None, seconds=round(time.perf_counter() - t0, 3))


def label_store(store_path: str | Path, annotations: str | Path | list, *, name: str = "tumor",
                classes: list[str] | None = None, missing: str = "negative",
                progress: bool = True) -> list[LabelResult]:
    """Write `slides/<id>/labels/<name>` for every complete slide of a store from annotation files
    matched by name (`<slide_id>.geojson` / `.xml`).

    Slides without a file are labelled all negative (`missing="negative"`: Camelyon16 normal slides
    and `wsi synth` normal slides have none) or left alone (`missing="skip"`). A bad file fails its
    slide only.
    """
    from tqdm.auto import tqdm

    try:
        validate_slide_id(name)
    except ValueError:
        raise ValueError(f"invalid label name {name!r}: use letters, digits, '.', '_' or '-'") from None
    if missing not in ("negative", "skip"):
        raise ValueError(f"missing must be 'negative' or 'skip', got {missing!r}")
    TileStore(store_path, mode="r")  # an existing store, never a new empty one made by a typo
    files = annotation_files(annotations)
    store = TileStore(store_path)
    ids = store.slide_ids()
    by_slide, unmatched = _match(files, set(ids))
    if unmatched:
        log.warning("%d annotation files match no slide in %s: %s", len(unmatched), store_path,
                    ", ".join(f.name for f in unmatched))
    results: list[LabelResult] = []
    no_file = [s for s in ids if s not in by_slide and store.status(s) == COMPLETE]
    if no_file:
        if missing == "negative":
            log.info("%d slides have no annotation file; labelled all negative (0). Pass --missing skip "
                     "to leave them unlabelled", len(no_file))
        else:
            log.info("%d slides have no annotation file; skipped", len(no_file))
    for sid in tqdm(ids, desc="labels", unit="slide", disable=not progress or len(ids) < 2):
        paths = by_slide.get(sid, [])
        src = str(paths[0]) if len(paths) == 1 else None
        if store.status(sid) != COMPLETE:
            results.append(LabelResult(sid, "skipped", source=src,
                                       error=f"slide status is {store.status(sid)}, not complete"))
            continue
        if len(paths) > 1:
            msg = f"{len(paths)} annotation files for one slide: {', '.join(map(str, paths))}; keep one"
            log.error("%s: failed: %s", sid, msg)
            results.append(LabelResult(sid, "failed", error=msg))
            continue
        if not paths and missing == "skip":
            results.append(LabelResult(sid, "skipped", error="no annotation file"))
            continue
        try:
            res = label_slide(store, sid, paths[0] if paths else None, name=name, classes=classes)
            log.debug("%s: %d of %d tiles positive", sid, res.n_positive, res.n_tiles)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one bad file never stops the rest
            msg = str(e) if isinstance(e, (AnnotationError, StoreError)) else f"{src}: {type(e).__name__}: {e}"
            log.error("%s: failed: %s", sid, msg)
            res = LabelResult(sid, "failed", source=src, error=msg)
        results.append(res)
    if classes:
        seen = {c.lower() for r in results if r.status == "labelled"
                for c in store.slide(r.slide_id)["labels"][name].attrs.get("classes", [])}
        absent = [c for c in classes if c.lower() not in seen]
        if absent and any(r.status == "labelled" for r in results):
            log.warning("classes found in no annotation file: %s", ", ".join(absent))
    return results


def results_table(results: list[LabelResult]) -> str:
    """Plain-text per-slide table and a closing count."""
    rows = [("slide", "status", "tiles", "positive", "source")]
    for r in results:
        rows.append((r.slide_id, r.status, str(r.n_tiles) if r.n_tiles or r.status in ("labelled", "negative")
                     else "-", str(r.n_positive) if r.status in ("labelled", "negative") else "-",
                     (r.error or (Path(r.source).name if r.source else "-"))[:100]))
    from .cli_common import format_table

    lines = [format_table(rows)]
    n = {k: sum(r.status == k for r in results) for k in ("labelled", "negative", "skipped", "failed")}
    lines.append(f"{n['labelled']} labelled from annotations, {n['negative']} all negative (no file), "
                 f"{n['skipped']} skipped, {n['failed']} failed, of {len(results)} slides")
    return "\n".join(lines)


def results_json(results: list[LabelResult]) -> list[dict]:
    return [asdict(r) for r in results]
