"""Captions made from per-tile labels (`clip captions STORE --labels NAME --out captions.csv`), and the
prompt sets behind them.

`TRAIN_TEMPLATES` x `TRAIN_SYNONYMS` make the training captions; `EVAL_TEMPLATES` (disjoint from the
training templates) and `EVAL_CLASSES` (phrases not used in training) are what zero-shot is measured
with (`write_classes_json` writes them as the CLASSES.json of `clip zeroshot`), so a zero-shot number
says whether the model learned the concept, not the training sentences.

Labels map to classes as `wsi.tile_classes` says: a binary fraction is positive when > 0.5, the LAST
class being the positive one (default ["normal", "tumor"]); class indices otherwise. NaN = unlabelled.
"""
from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from wsi.errors import LabelsError
from wsi.runtime import atomic_write_json, atomic_write_text
from wsi.store import TileStore
from wsi.tile_classes import tiles_by_class

from .data import CaptionsError

DEFAULT_CLASSES = ("normal", "tumor")       # [negative, positive] of a binary label
TRAIN_TEMPLATES = (
    "an H&E image of {}.",
    "a histopathology tile showing {}.",
    "an H&E stained section of {}.",
    "a microscopy image of {}.",
    "histology of {}.",
    "a tissue patch with {}.",
    "this region of the slide shows {}.",
    "a pathology image of {}.",
    "{} seen under the microscope.",
    "a hematoxylin and eosin stained tile of {}.",
)
TRAIN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumor": ("tumor", "carcinoma", "malignant epithelium", "cancerous tissue"),
    "normal": ("normal tissue", "benign tissue", "non-neoplastic tissue", "healthy stroma"),
}
EVAL_TEMPLATES = (
    "a photomicrograph of {}.",
    "an image of {} at high magnification.",
    "a whole slide image patch of {}.",
    "a stained tissue sample showing {}.",
    "an example of {}.",
)
# New phrases made of words the training captions use: a text tower trained from scratch (pathoclip-lite,
# pathoclip-tiny) has learned nothing about words it never saw.
EVAL_CLASSES: dict[str, tuple[str, ...]] = {
    "normal": ("normal stroma", "healthy tissue", "benign epithelium"),
    "tumor": ("tumor tissue", "malignant tissue", "cancerous epithelium"),
}


def write_classes_json(path: str | Path, classes: Mapping[str, Sequence[str]] | None = None,
                       templates: Sequence[str] | None = None) -> Path:
    """CLASSES.json for `clip zeroshot`: {"classes": {name: [synonyms]}, "templates": [...]}, by default
    the evaluation prompts (EVAL_CLASSES, EVAL_TEMPLATES); of two classes, the last is named "positive"
    (what a fraction label > 0.5 is)."""
    classes = EVAL_CLASSES if classes is None else classes
    obj = {"classes": {k: list(v) for k, v in classes.items()},
           "templates": list(EVAL_TEMPLATES if templates is None else templates)}
    if len(classes) == 2:
        obj["positive"] = list(classes)[-1]
    return atomic_write_json(path, obj)


def captions_from_labels(store: TileStore | str | Path, labels_name: str, out_csv: str | Path,
                         classes: Sequence[str] | None = None, templates: Sequence[str] | None = None,
                         synonyms: Mapping[str, Sequence[str]] | None = None, seed: int = 0, per_tile: int = 1,
                         slides: Sequence[str] | None = None, balance_classes: bool = False,
                         patients: Mapping[str, str] | None = None) -> dict:
    """Write `out_csv` (slide_id,tile,caption[,patient_id]): `per_tile` captions for each labelled tile of `slides`
    (default: every complete slide with pixels), each "template.format(synonym)" of the tile's class.

    The captions are balanced: per class, the template x synonym combinations are dealt out in turn
    (in a seeded order, to tiles in a seeded order), so every combination is used equally often (+-1)
    and a tile's `per_tile` captions differ. `balance_classes` also draws as many tiles of each class as
    the rarest class has. `patients` ({slide_id: patient_id}, `wsi.splits.read_patients`) adds a
    patient_id column, so `clip train` splits by patient. Returns a summary: rows, tiles, per-class tile counts, skipped slides."""
    st = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
    classes = list(classes or DEFAULT_CLASSES)
    templates = list(templates or TRAIN_TEMPLATES)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise CaptionsError(f"classes {classes}: give two or more distinct class names ([negative, positive] "
                            "for a binary label)")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise CaptionsError(f"template {bad[0]!r} must hold one '{{}}' where the class phrase goes")
    syn = {c: list((synonyms or {}).get(c) or TRAIN_SYNONYMS.get(c) or (c,)) for c in classes}
    combos = {c: [t.format(s) for t, s in itertools.product(templates, syn[c])] for c in classes}
    if per_tile < 1 or per_tile > min(len(v) for v in combos.values()):
        raise CaptionsError(f"per_tile {per_tile}: give 1..{min(len(v) for v in combos.values())} (the number of "
                            "templates x synonyms of the class with the fewest)")
    ids = list(slides) if slides is not None else st.complete_ids()
    try:
        tiles, skipped, unlabelled = tiles_by_class(st, labels_name, len(classes), ids)
    except LabelsError as e:
        raise CaptionsError(str(e)) from None
    rng = np.random.default_rng(seed)
    if balance_classes:
        n_min = min(len(t) for t in tiles)
        tiles = [[t[i] for i in sorted(rng.choice(len(t), n_min, replace=False))] for t in tiles]
    rows: list[tuple[str, int, str]] = []
    for k, c in enumerate(classes):
        deck = [combos[c][i] for i in rng.permutation(len(combos[c]))]
        for j, t in enumerate(rng.permutation(len(tiles[k]))):   # the j-th tile dealt gets the next cards
            sid, idx = tiles[k][t]
            rows += [(sid, idx, deck[(j * per_tile + r) % len(deck)]) for r in range(per_tile)]
    order = {s: i for i, s in enumerate(ids)}
    rows.sort(key=lambda r: (order[r[0]], r[1]))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if patients is None:
        w.writerow(["slide_id", "tile", "caption"])
        w.writerows(rows)
    else:
        w.writerow(["slide_id", "tile", "caption", "patient_id"])
        w.writerows((*r, patients.get(r[0], r[0])) for r in rows)
    atomic_write_text(out_csv, buf.getvalue())
    return {"out": str(out_csv), "labels": labels_name, "rows": len(rows), "tiles": sum(len(t) for t in tiles),
            "slides": len({r[0] for r in rows}), "per_tile": per_tile, "classes": classes,
            "per_class": {c: len(tiles[k]) for k, c in enumerate(classes)}, "templates": len(templates),
            "unlabelled_tiles": unlabelled, "skipped_slides": skipped, "balance_classes": bool(balance_classes)}
