"""Per-tile labels of the store as classes: the one mapping from a labels array (`labels/<name>`) to
class indices, and the tiles of each class.

A labels array maps to classes so:
- class indices (every labelled value an integer): value k is the k-th class;
- a binary fraction (values in [0, 1], e.g. the tumour fraction `wsi labels` writes): class 1 (the
  positive, LAST of exactly two classes) when > `THRESHOLD`, else class 0;
- NaN: unlabelled (-1).
Zero-shot, the probe, the captions of `clip captions` and the reasoner's MCQs all read labels this way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from wsi.errors import LabelsError

THRESHOLD = 0.5     # a binary fraction above it is the positive class


def is_fraction(values: np.ndarray) -> bool:
    """Whether the labelled (finite) values are a binary fraction rather than class indices."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return bool(len(v)) and not np.all(v == np.round(v)) and v.min() >= 0 and v.max() <= 1


def class_indices(values: np.ndarray, n_classes: int | None, where: str) -> np.ndarray:
    """Per-tile labels -> int64 class indices, -1 where unlabelled (NaN); see the module docstring.
    `n_classes` (None: not checked) bounds the indices; `where` names the array in errors (LabelsError)."""
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    y = np.full(len(v), -1, np.int64)
    if not ok.any():
        return y
    if np.all(v[ok] == np.round(v[ok])):
        y[ok] = v[ok].astype(np.int64)
        if y[ok].min() < 0 or (n_classes is not None and y[ok].max() >= n_classes):
            raise LabelsError(f"{where}: class indices {int(y[ok].min())}..{int(y[ok].max())} do not fit the "
                              f"{n_classes} classes; list one class per index")
    elif v[ok].min() >= 0 and v[ok].max() <= 1:
        if n_classes not in (None, 2):
            raise LabelsError(f"{where}: binary fraction labels need exactly 2 classes (negative first, "
                              f"positive last), not {n_classes}")
        y[ok] = (v[ok] > THRESHOLD).astype(np.int64)
    else:
        raise LabelsError(f"{where}: labels are neither class indices nor fractions in [0, 1]; "
                          "pass an integer class array or a binary fraction label")
    return y


def tiles_by_class(store, labels_name: str, n_classes: int, slides: Sequence[str] | None = None
                   ) -> tuple[list[list[tuple[str, int]]], dict[str, str], int]:
    """Per class (index k), the (slide_id, tile) of every tile of `slides` (default: the complete ones)
    whose label is class k; the slides skipped with why (no pixels, no labels); how many tiles are
    unlabelled (NaN). LabelsError when a slide is not in the store or no tile is labelled."""
    ids = list(slides) if slides is not None else store.complete_ids()
    missing = [s for s in ids if s not in store.slide_ids()]
    if missing:
        raise LabelsError(f"{store.path}: no slide {missing[0]!r} in the store (see `wsi info {store.path}`)")
    tiles: list[list[tuple[str, int]]] = [[] for _ in range(n_classes)]
    skipped: dict[str, str] = {}
    unlabelled = 0
    for sid in ids:
        view = store[sid]
        values = view.labels(labels_name)
        if view.meta.features_only:
            skipped[sid] = "no pixels (a features-only import)"
        elif values is None:
            skipped[sid] = f"no labels {labels_name!r}"
        else:
            cls = class_indices(values, n_classes, f"{store.path}: labels {labels_name!r} of slide {sid!r}")
            unlabelled += int(np.sum(cls < 0))
            for k in range(n_classes):
                tiles[k].extend((sid, int(i)) for i in np.flatnonzero(cls == k))
    if not any(tiles):
        raise LabelsError(f"{store.path}: no tile has labels {labels_name!r} ({len(skipped)} slides without); "
                          f"make them with `wsi labels {store.path} --name {labels_name}`")
    return tiles, skipped, unlabelled

