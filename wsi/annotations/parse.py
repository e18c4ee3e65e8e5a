"""Region annotations read (QuPath GeoJSON, ASAP / Camelyon16 XML) and tiles written (QuPath GeoJSON).

Coordinates are level-0 pixels, the convention of QuPath exports, ASAP and the store's `coords`.
The reader turns area annotations into `Region`s (exclusions marked: Camelyon16 group `_2`); the
writer, `tiles_geojson`, gives tiles with per-tile measurements as QuPath "tile" objects, which this
reader reads back with `object_types={"tile"}`.

QuPath's GeoJSON, as each version writes it, read as QuPath's own reader does:
- object type: `properties.objectType` (>= 0.3), the legacy `object_type`, or in 0.2 the feature's
  `"id"` (`PathAnnotationObject`, `PathDetectionObject`, `PathCellObject`, `PathTileObject`); an
  untyped or unknown object is an annotation. Only annotations are regions: detections, cells and
  tiles are QuPath's measured objects (often thousands of cells), not areas someone annotated.
- class: `classification.names` (>= 0.4 derived classes, `["Tumor", "Positive"]` -> "Tumor: Positive"),
  `classification.name` with its `parentClass` chain (<= 0.3), else `properties.name`; "" when
  unclassified (shown as "unclassified"). A class matches a chosen name by its full name or its base
  (the first name), so `Tumor` matches "Tumor: Positive".
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Collection

import numpy as np

from ..errors import AnnotationError

log = logging.getLogger(__name__)

EXCLUSION_CLASSES = frozenset({"_2", "exclusion"})   # always subtracted from the included regions
IGNORED_CLASSES = frozenset({"ignore*", "region*"})  # QuPath's own "Ignore*" and "Region*": unused by default
UNCLASSIFIED = "unclassified"                        # how a region without a class is named to users
ANNOTATION_SUFFIXES = (".geojson", ".json", ".xml")
ANNOTATION_OBJECTS = frozenset({"annotation"})      # QuPath object types read by default
# QuPath 0.2 wrote the Java class as the feature's "id"; QuPath's reader maps these (and the
# snake-case TMA name) to today's object types.
_QUPATH_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection", "PathCellObject": "cell",
                 "PathTileObject": "tile", "TMACoreObject": "tmaCore", "PathRootObject": "root", "tma_core": "tmaCore"}
_KNOWN_TYPES = frozenset(_QUPATH_TYPES.values())
_AREA_TYPES_ASAP = {"polygon", "spline", "rectangle"}
_NO_AREA_GEOMETRIES = {"Point", "MultiPoint", "LineString", "MultiLineString"}


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


def class_base(name: str) -> str:
    """The base of a QuPath derived class: "Tumor" of "Tumor: Positive"."""
    return name.split(":", 1)[0].strip()


def class_label(name: str) -> str:
    """A class as users are told it: "unclassified" for a region without one."""
    return name.strip() or UNCLASSIFIED


def class_matches(name: str, wanted: Collection[str]) -> bool:
    """Whether class `name` is one of `wanted` (lower-case): by its full name, its base class, or
    "unclassified" for a region without a class."""
    n = name.strip().lower()
    return (n or UNCLASSIFIED) in wanted or class_base(n) in wanted


def is_exclusion(name: str, extra: Collection[str] = ()) -> bool:
    """Whether class `name` is subtracted: `_2`, `Exclusion`, or one of `extra` (any case)."""
    return class_matches(name, EXCLUSION_CLASSES | {c.strip().lower() for c in extra})


def is_ignored(name: str) -> bool:
    """QuPath's own "Ignore*" and "Region*" classes (the literal names, star included; derived too)."""
    return class_matches(name, IGNORED_CLASSES)


# ---- reading -------------------------------------------------------------------------------------
def read_annotations(path: str | Path, object_types: Collection[str] = ANNOTATION_OBJECTS) -> list[Region]:
    """Regions of a QuPath GeoJSON (.geojson/.json) or ASAP XML (.xml) file; other suffixes are sniffed.
    `object_types`: the QuPath objects of a GeoJSON file to read (ASAP files hold annotations only)."""
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
    return parse_geojson(text, path, object_types)


def parse_geojson(text: str, path: str | Path = "<geojson>",
                  object_types: Collection[str] = ANNOTATION_OBJECTS) -> list[Region]:
    """QuPath GeoJSON: a FeatureCollection, a bare list of Features (QuPath's export), or one Feature.

    Only objects of `object_types` are used (the type read as QuPath reads it, see the module
    docstring; an untyped object is an annotation): by default annotations, so detections, cells and
    tiles are skipped, and a file holding nothing else gets a warning naming it. The class is the
    QuPath classification's full derived name ("Tumor: Positive"), else `properties.name`, else "".
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
    skipped: Counter[str] = Counter()
    kept = 0
    for i, feat in enumerate(features):
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise AnnotationError(f"{path}: item {i} is not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{path}: feature {i}: 'properties' is not an object")
        obj = object_type(feat)
        if obj not in object_types:
            skipped[obj] += 1
            continue
        kept += 1
        name = _class_name(props)
        for ext, holes in _polygons(feat.get("geometry"), f"{path}: feature {i}"):
            regions.append(Region(name, ext, holes, is_exclusion(name)))
    if skipped and not kept:
        what = ", ".join(f"{n} {t}" for t, n in skipped.most_common())
        log.warning("%s: no QuPath %s objects, only %s objects, which are not read as annotated regions "
                    "(QuPath's detections, cells and tiles are measured objects, not annotations): no tile is "
                    "labelled from this file; export the annotations, or convert the detections to annotations "
                    "in QuPath", path, "/".join(sorted(object_types)), what)
    elif skipped:
        log.debug("%s: skipped %d objects of other types than %s", path, sum(skipped.values()),
                  ", ".join(sorted(object_types)))
    return regions


def object_type(feat: dict) -> str:
    """A QuPath GeoJSON feature's object type, as QuPath's reader finds it: `properties.objectType`,
    the legacy `object_type` or `type`, else the 0.2 `"id"` (`PathDetectionObject`, ...); untyped or
    unknown: "annotation". One of annotation, detection, cell, tile, tmaCore, root."""
    props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
    t = None
    for key in ("objectType", "object_type", "type"):
        if isinstance(props.get(key), str):
            t = props[key]
            break
    if t is None and isinstance(feat.get("objectType"), str):
        t = feat["objectType"]
    if t is None and isinstance(feat.get("id"), str) and feat["id"] in _QUPATH_TYPES:
        t = feat["id"]
    t = _QUPATH_TYPES.get(t, t)
    return t if t in _KNOWN_TYPES else "annotation"


def _class_name(props: dict) -> str:
    c = props.get("classification")
    if isinstance(c, dict):
        names = c.get("names")          # QuPath >= 0.4: ["Tumor", "Positive"] for "Tumor: Positive"
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(n.strip() for n in names)
        if isinstance(c.get("name"), str):
            chain, parent = [c["name"].strip()], c.get("parentClass")
            while isinstance(parent, dict) and isinstance(parent.get("name"), str) and len(chain) < 32:
                chain.insert(0, parent["name"].strip())          # QuPath <= 0.3 derived classes
                parent = parent.get("parentClass")
            return ": ".join(chain)
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


def check_class_options(classes: Collection[str] | None, exclude: Collection[str] | None) -> None:
    """AnnotationError when a class is both chosen and excluded."""
    if not classes:
        return
    excl = EXCLUSION_CLASSES | {c.strip().lower() for c in exclude or ()}
    both = [c for c in classes if c.strip().lower() in excl]
    if both:
        raise AnnotationError(f"class {', '.join(both)} is both chosen (--classes) and subtracted (--exclude-classes, "
                              "or _2 / Exclusion); drop it from one of them")


def select_regions(regions: list[Region], classes: Collection[str] | None = None,
                   exclude: Collection[str] | None = None) -> list[Region]:
    """The regions that label tiles: exclusions always (`_2`, `Exclusion` and the `exclude` classes,
    marked `exclude=True`: subtracted like holes), plus the chosen classes.

    `classes=None`: every class but exclusions and QuPath's "Ignore*" / "Region*" (the literal names:
    "Regional metastasis" is used). Otherwise the named classes (case-insensitive; a base class such
    as `Tumor` also picks its derived classes, "Tumor: Positive"; `unclassified` picks regions without
    a class).
    """
    check_class_options(classes, exclude)
    wanted = None if classes is None else {c.strip().lower() for c in classes}
    out = []
    for r in regions:
        if r.exclude or (exclude and is_exclusion(r.name, exclude)):
            out.append(r if r.exclude else replace(r, exclude=True))
        elif (not is_ignored(r.name)) if wanted is None else class_matches(r.name, wanted):
            out.append(r)
    return out


def region_classes(found: list[Region], selected: list[Region]) -> dict[str, list[str]]:
    """Which classes of a file were used, excluded (subtracted) and ignored (neither), as users are
    told them ("unclassified" for regions without a class), each sorted."""
    chosen = {id(r) for r in selected}
    used = {class_label(r.name) for r in selected if not r.exclude}
    excluded = {class_label(r.name) for r in selected if r.exclude}
    ignored = {class_label(r.name) for r in found if id(r) not in chosen} - used - excluded
    return {"used": sorted(used), "excluded": sorted(excluded), "ignored": sorted(ignored)}


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


# ---- writing -------------------------------------------------------------------------------------
def tiles_geojson(coords: np.ndarray, size0: float, measurements: dict[str, np.ndarray]) -> dict:
    """Tiles as QuPath 'tile' objects: closed level-0 square rings (int px) with their measurements
    (4 decimals). `read_annotations(path, object_types={"tile"})` reads them back as Regions."""
    s = int(round(size0))
    cols = {k: np.asarray(v, np.float64).round(4).tolist() for k, v in measurements.items()}
    feats = []
    for i, (x, y) in enumerate(np.asarray(coords).astype(np.int64).tolist()):
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "tile", "name": f"tile {i}",
                                     "measurements": {k: v[i] for k, v in cols.items()}}})
    return {"type": "FeatureCollection", "features": feats}
