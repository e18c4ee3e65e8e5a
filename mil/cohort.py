"""A MIL cohort: the slides of a labels CSV as bags of features, from one feature source.

A feature source is where bags come from; there are two, behind one interface (`FeatureSource`):

    StoreFeatures   a tile store: `features/<encoder>`, coords and per-tile labels of its complete slides
    H5Features      a CLAM (h5_files/) or TRIDENT (features_<encoder>/) folder of h5 files

`load_cohort` joins a labels CSV (mil.labels) with a source; `Cohort.fingerprint()` is what a run
records to refuse resuming on other data.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wsi.errors import CohortError

from .labels import LabelRow, class_mapping, labels_digest, read_labels_csv

log = logging.getLogger(__name__)

_LIST = 10  # ids named in a message before "..."


def name_ids(ids: list[str]) -> str:
    """At most ten ids, comma-separated, then how many more."""
    return ", ".join(ids[:_LIST]) + (f", ... ({len(ids) - _LIST} more)" if len(ids) > _LIST else "")


# ---- bags and cohorts ----------------------------------------------------------------------------
@dataclass
class Bag:
    slide_id: str
    patient_id: str
    label: int                              # index into Cohort.class_names
    features: np.ndarray                    # (N, D) float32 (float16 kept as float16; the batcher converts)
    coords: np.ndarray                      # (N, 2) int64 level-0 top-left x, y
    instance_labels: np.ndarray | None = None   # (N,) float32 in [0, 1] (tile positive if > 0.5)


@dataclass
class Cohort:
    bags: list[Bag]
    class_names: list[str]
    positive_class: str | None              # class_names[1] of a binary task, else None
    encoder: str
    source: str                             # store path or h5 folder (as given)
    csv_split: list[str] | None = None      # per bag "train" / "val" / "test" from the CSV, or None
    labels_csv: str | None = None
    source_kind: str | None = None          # "store" | "h5"; None for a cohort built in memory
    labels_sha256: str | None = None        # of the labels CSV's bytes when it was read

    @property
    def dim(self) -> int:
        return int(self.bags[0].features.shape[1])

    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags], dtype=np.int64)

    def patients(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags], dtype=object)

    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]

    def fingerprint(self) -> dict[str, Any]:
        """What the cohort was made of: the labels CSV (path, sha256) and the feature source (kind,
        resolved path, encoder, slide count, and a sha256 over every bag's id, patient, label, split,
        features, coords and instance labels). Hashing runs at about 2 GB/s, far faster than the
        features were read."""
        h = hashlib.sha256()
        for i, b in enumerate(self.bags):
            split = self.csv_split[i] if self.csv_split is not None else ""
            h.update(repr((b.slide_id, b.patient_id, self.class_names[b.label], split, b.features.shape,
                           str(b.features.dtype))).encode())
            for a in (b.features, b.coords, b.instance_labels):
                if a is not None:
                    h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
        local = self.source_kind is not None
        return {"labels_csv": str(Path(self.labels_csv).resolve()) if self.labels_csv else None,
                "labels_sha256": self.labels_sha256,
                "features": {"kind": self.source_kind or "memory",
                             "path": str(Path(self.source).resolve()) if local else self.source,
                             "encoder": self.encoder, "slides": len(self.bags), "sha256": h.hexdigest()}}


# ---- feature sources -----------------------------------------------------------------------------
class FeatureSource(Protocol):
    """Where bags come from. `slide_ids()` lists the slides holding the encoder's features; `read`
    gives one slide's (features (N, D) float16/32, coords (N, 2) int64)."""

    kind: str                               # "store" | "h5"
    path: str
    encoder: str

    def describe(self) -> str: ...
    def slide_ids(self) -> list[str]: ...
    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]: ...
    def check_instance_labels(self, name: str) -> None: ...
    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None: ...


class StoreFeatures:
    """Features of a tile store's complete slides (a TileStore or its path, opened read-only)."""

    kind = "store"

    def __init__(self, store, encoder: str):
        from wsi.store import TileStore

        self.store = store if isinstance(store, TileStore) else TileStore.open(store, readonly=True)
        self.path, self.encoder = str(self.store.path), encoder

    def describe(self) -> str:
        return f"{self.path} (features {self.encoder!r})"

    def slide_ids(self) -> list[str]:
        return [s for s in self.store.complete_ids() if self.store[s].has_features(self.encoder)]

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        view = self.store[slide_id]
        return view.features(self.encoder), view.coords

    def check_instance_labels(self, name: str) -> None:
        pass

    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None:
        return self.store[slide_id].labels(name)


class H5Features:
    """Features of a CLAM or TRIDENT h5 folder (files TRIDENT is still writing are left out)."""

    kind = "h5"

    def __init__(self, h5_dir: str | Path, encoder: str):
        from wsi.h5 import h5_feature_files

        self.path, self.encoder = str(h5_dir), encoder
        self.files = h5_feature_files(h5_dir, encoder)

    def describe(self) -> str:
        return self.path

    def slide_ids(self) -> list[str]:
        return sorted(self.files)

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        from wsi.h5 import read_h5_bag

        return read_h5_bag(self.files[slide_id])

    def check_instance_labels(self, name: str) -> None:
        raise CohortError(f"instance labels {name!r} live in a tile store, not in h5 files; import the h5 folder "
                          f"with `wsi import-h5 {self.path} --store STORE --encoder {self.encoder}`, pass --store")

    def instance_labels(self, slide_id: str, name: str) -> np.ndarray | None:
        self.check_instance_labels(name)
        return None


def feature_source(*, store=None, h5_dir: str | Path | None = None, encoder: str) -> FeatureSource:
    """The source of exactly one of `store` (a TileStore or its path) and `h5_dir`."""
    if (store is None) == (h5_dir is None):
        raise CohortError("give exactly one of store (a tile store) or h5_dir (a CLAM / TRIDENT feature folder)")
    return StoreFeatures(store, encoder) if store is not None else H5Features(h5_dir, encoder)


# ---- loading -------------------------------------------------------------------------------------
def _as_features(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float16) else a.astype(np.float32)


def load_cohort(labels_csv: str | Path, *, store=None, h5_dir: str | Path | None = None, encoder: str,
                instance_labels: str | None = None, classes: list[str] | None = None,
                positive: str | None = None, progress: bool = True, source: FeatureSource | None = None) -> Cohort:
    """Bags of the slides in `labels_csv` that have `encoder` features in `store` (a TileStore or its
    path) or in the CLAM / TRIDENT folder `h5_dir` (exactly one of the two; or a ready `source`).
    Slides without features and slides with features but no CSV row are each named in one warning."""
    from tqdm.auto import tqdm

    rows = read_labels_csv(labels_csv)
    digest = labels_digest(labels_csv)
    if source is None:
        source = feature_source(store=store, h5_dir=h5_dir, encoder=encoder)
    if instance_labels:
        source.check_instance_labels(instance_labels)
    where = source.describe()
    avail = set(source.slide_ids())
    wanted = {r.slide_id for r in rows}
    missing = [r.slide_id for r in rows if r.slide_id not in avail]
    unlabelled = sorted(s for s in avail if s not in wanted)
    if missing:
        log.warning("%d of %d slides in %s have no %r features in %s and are left out: %s", len(missing), len(rows),
                    labels_csv, source.encoder, where, name_ids(missing))
    if unlabelled:
        log.warning("%d slides with features in %s have no row in %s and are left out: %s", len(unlabelled),
                    where, labels_csv, name_ids(unlabelled))
    todo = [r for r in rows if r.slide_id in avail]
    if not todo:
        raise CohortError(f"{labels_csv}: none of its {len(rows)} slides has {source.encoder!r} features in {where}; "
                          "check the slide ids and --encoder")

    loaded: list[tuple[LabelRow, np.ndarray, np.ndarray, np.ndarray | None]] = []
    empty, no_labels = [], []
    for r in tqdm(todo, desc="load bags", unit="slide", disable=not progress):
        feats, coords = source.read(r.slide_id)
        feats = _as_features(feats)
        if len(feats) == 0:
            empty.append(r.slide_id)
            continue
        inst = None
        if instance_labels:
            inst = source.instance_labels(r.slide_id, instance_labels)
            if inst is None:
                no_labels.append(r.slide_id)
            else:
                inst = np.asarray(inst, dtype=np.float32).reshape(-1)
                if len(inst) != len(feats):
                    raise CohortError(f"{source.path}: slide {r.slide_id!r} has {len(inst)} {instance_labels!r} "
                                      f"labels for {len(feats)} tiles; write its labels again for the current tiles")
        loaded.append((r, feats, np.asarray(coords, dtype=np.int64), inst))
    if empty:
        log.warning("%d slides have 0 tiles and are left out: %s", len(empty), name_ids(empty))
    if no_labels:
        log.warning("%d of %d slides have no %r instance labels (their instance metrics are skipped): %s",
                    len(no_labels), len(loaded), instance_labels, name_ids(no_labels))
    if not loaded:
        raise CohortError(f"{where}: every slide of {labels_csv} with features has 0 tiles; tile them again")
    dims = {f.shape[1] for _, f, _, _ in loaded}
    if len(dims) > 1:
        raise CohortError(f"{where}: {source.encoder!r} features of different widths {sorted(dims)}; re-embed the "
                          "slides with one encoder")
    names, pos = class_mapping([r.label for r, *_ in loaded], classes=classes, positive=positive,
                               where=str(labels_csv))
    present = sorted({r.label for r, *_ in loaded})
    if len(present) < 2:
        raise CohortError(f"{labels_csv}: every slide with features has label {present[0]!r}; MIL needs at least "
                          "two classes: add slides of another class or embed the missing ones")
    index = {n: i for i, n in enumerate(names)}
    bags = [Bag(r.slide_id, r.patient_id, index[r.label], f, c, inst) for r, f, c, inst in loaded]
    csv_split = [r.split for r, *_ in loaded] if loaded[0][0].split is not None else None
    return Cohort(bags, names, pos, source.encoder, source.path, csv_split, str(labels_csv),
                  source_kind=source.kind, labels_sha256=digest)
