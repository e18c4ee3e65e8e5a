"""Per-tile labels written into the store from annotation files: `wsi labels`.

Each complete slide gets `labels/<name>`: the fraction of every tile inside the annotated regions
(`raster.tile_fractions`); a tile is positive when that fraction is > `POSITIVE_FRACTION` (0.5).
Files are matched to slides by name (`<slide_id>.geojson` / `.xml`). Which regions count is
`parse.select_regions`: the chosen classes, minus exclusions (`_2`, `Exclusion`, `exclude_classes`);
each slide records, and the summary says, which classes were used, excluded and ignored.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AnnotationError, StoreError
from ..store import COMPLETE, SlideView, TileStore, slide_id_from_path, validate_name
from .parse import (annotation_files, check_class_options, class_base, class_label, read_annotations, region_classes,
                    select_regions)
from .raster import tile_fractions

log = logging.getLogger(__name__)

POSITIVE_FRACTION = 0.5


@dataclass
class LabelResult:
    slide_id: str
    status: str                  # labelled (from a file) | negative (no file: all 0) | skipped | failed
    n_tiles: int = 0
    n_positive: int = 0
    source: str | None = None    # the annotation file
    error: str | None = None
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)    # the file's classes that labelled tiles
    excluded: list[str] = field(default_factory=list)   # ... that were subtracted
    ignored: list[str] = field(default_factory=list)    # ... that were neither


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


def _tile_size_level0(view: SlideView) -> int:
    """The slide's tile side in level-0 px; StoreError saying how to get it when the store lacks it."""
    m = view.meta
    if not m.tile_size_level0:
        fix = ("import it again with the patching attributes (CLAM: the patches/ folder beside h5_files/; "
               "or tile the slide with `wsi tile`)" if m.features_only else "tile it again with `wsi tile --overwrite`")
        raise StoreError(f"{view.store.path}: slide {view.slide_id!r} does not record its tile size at level 0; {fix}")
    return m.tile_size_level0


def label_slide(view: SlideView, path: Path | None, *, name: str = "tumor", classes: list[str] | None = None,
                exclude_classes: list[str] | None = None) -> LabelResult:
    """Label one slide's tiles from one annotation file (None: all negative) and write them.
    `classes`: the classes to use (None: all but exclusions and QuPath's Ignore* / Region*);
    `exclude_classes`: classes subtracted like holes, besides `_2` and `Exclusion`."""
    t0 = time.perf_counter()
    coords = view.coords
    attrs = {"source": str(path) if path else None, "selected_classes": list(classes) if classes else None,
             "exclude_classes": list(exclude_classes) if exclude_classes else None,
             "rule": f"positive if fraction > {POSITIVE_FRACTION}", "positive_fraction": POSITIVE_FRACTION}
    kinds = {"used": [], "excluded": [], "ignored": []}
    if path is None:
        values = np.zeros(len(coords), np.float32)
        attrs |= {"classes": [], "excluded_classes": [], "ignored_classes": [], "n_regions": 0, "n_exclusions": 0}
    else:
        found = read_annotations(path)
        regions = select_regions(found, classes, exclude_classes)
        kinds = region_classes(found, regions)
        if found and not kinds["used"]:
            have = sorted({class_label(r.name) for r in found})
            log.warning("%s: no region of the chosen classes (%s); it has: %s", path,
                        ", ".join(classes) if classes else "default", ", ".join(have))
        size = _tile_size_level0(view)
        values = tile_fractions(regions, coords, size)
        attrs |= {"classes": kinds["used"], "excluded_classes": kinds["excluded"], "ignored_classes": kinds["ignored"],
                  "n_regions": sum(not r.exclude for r in regions), "n_exclusions": sum(r.exclude for r in regions),
                  "tile_size_level0": size}
    n_pos = int((values > POSITIVE_FRACTION).sum())
    view.write_labels(name, values, attrs | {"n_positive": n_pos})
    return LabelResult(view.slide_id, "labelled" if path else "negative", len(values), n_pos,
                       str(path) if path else None, seconds=round(time.perf_counter() - t0, 3),
                       classes=kinds["used"], excluded=kinds["excluded"], ignored=kinds["ignored"])


def label_store(store_path: str | Path, annotations: str | Path | list, *, name: str = "tumor",
                classes: list[str] | None = None, exclude_classes: list[str] | None = None,
                missing: str = "negative", progress: bool = True) -> list[LabelResult]:
    """Write `labels/<name>` of every complete slide of an existing store from annotation files
    matched by name (`<slide_id>.geojson` / `.xml`).

    Slides without a file are labelled all negative (`missing="negative"`: Camelyon16 normal slides
    and `wsi synth` normal slides have none) or left alone (`missing="skip"`). A bad file fails its
    slide only. `classes` / `exclude_classes`: see `label_slide`.
    """
    from tqdm.auto import tqdm

    validate_name(name, "label")
    if missing not in ("negative", "skip"):
        raise ValueError(f"missing must be 'negative' or 'skip', got {missing!r}")
    check_class_options(classes, exclude_classes)
    store = TileStore.open(store_path)  # an existing store, never a new empty one made by a typo
    files = annotation_files(annotations)
    ids = store.slide_ids()
    status = {sid: store.status(sid) for sid in ids}
    by_slide, unmatched = _match(files, set(ids))
    if unmatched:
        log.warning("%d annotation files match no slide in %s: %s", len(unmatched), store_path,
                    ", ".join(f.name for f in unmatched))
    results: list[LabelResult] = []
    no_file = [s for s in ids if s not in by_slide and status[s] == COMPLETE]
    if no_file:
        if missing == "negative":
            log.info("%d slides have no annotation file; labelled all negative (0). Pass --missing skip "
                     "to leave them unlabelled", len(no_file))
        else:
            log.info("%d slides have no annotation file; skipped", len(no_file))
    for sid in tqdm(ids, desc="labels", unit="slide", disable=not progress or len(ids) < 2):
        paths = by_slide.get(sid, [])
        src = str(paths[0]) if len(paths) == 1 else None
        if status[sid] != COMPLETE:
            results.append(LabelResult(sid, "skipped", source=src,
                                       error=f"slide status is {status[sid]}, not complete"))
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
            res = label_slide(store[sid], paths[0] if paths else None, name=name, classes=classes,
                              exclude_classes=exclude_classes)
            log.debug("%s: %d of %d tiles positive", sid, res.n_positive, res.n_tiles)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # one bad file never stops the rest
            msg = str(e) if isinstance(e, (AnnotationError, StoreError)) else f"{src}: {type(e).__name__}: {e}"
            log.error("%s: failed: %s", sid, msg)
            res = LabelResult(sid, "failed", source=src, error=msg)
        results.append(res)
    labelled = [r for r in results if r.status == "labelled"]
    for what, given, got in (("classes", classes, lambda r: r.classes),
                             ("exclude classes", exclude_classes, lambda r: r.excluded)):
        seen = {n.lower() for r in labelled for c in got(r) for n in (c, class_base(c))}
        absent = [c for c in given or () if c.strip().lower() not in seen]
        if absent and labelled:
            log.warning("%s found in no annotation file: %s", what, ", ".join(absent))
    return results


def results_table(results: list[LabelResult]) -> str:
    """Plain-text per-slide table and a closing count."""
    rows = [("slide", "status", "tiles", "positive", "source")]
    for r in results:
        rows.append((r.slide_id, r.status, str(r.n_tiles) if r.n_tiles or r.status in ("labelled", "negative")
                     else "-", str(r.n_positive) if r.status in ("labelled", "negative") else "-",
                     (r.error or (Path(r.source).name if r.source else "-"))[:100]))
    from ..cli_common import format_table

    lines = [format_table(rows)]
    n = {k: sum(r.status == k for r in results) for k in ("labelled", "negative", "skipped", "failed")}
    lines.append(f"{n['labelled']} labelled from annotations, {n['negative']} all negative (no file), "
                 f"{n['skipped']} skipped, {n['failed']} failed, of {len(results)} slides")
    if n["labelled"]:
        lines.append(classes_summary(results))
    return "\n".join(lines)


def classes_summary(results: list[LabelResult]) -> str:
    """One line: the classes used, excluded and ignored over the labelled slides, each with how many
    slides' files had it: `classes used: Tumor (2 slides); excluded: _2 (1 slide); ignored: none`."""
    parts = []
    for what, get in (("classes used", lambda r: r.classes), ("excluded", lambda r: r.excluded),
                      ("ignored", lambda r: r.ignored)):
        count = Counter(c for r in results if r.status == "labelled" for c in get(r))
        cells = ", ".join(f"{c} ({k} slide{'s' * (k != 1)})" for c, k in sorted(count.items())) or "none"
        parts.append(f"{what}: {cells}")
    return "; ".join(parts)


def results_json(results: list[LabelResult]) -> list[dict]:
    return [asdict(r) for r in results]
