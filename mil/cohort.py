"""A MIL cohort: the slides of a labels CSV as bags of features, from one feature source.

A feature source is where bags come from (`mil.sources`: `StoreFeatures` for a tile store,
`H5Features` for a CLAM / TRIDENT h5 folder, behind one interface, `FeatureSource`).

`load_cohort` joins a labels CSV (mil.labels) with a source. It reads every bag once: the features
are hashed into `Cohort.fingerprint()` (what a run records to refuse resuming on other data) and kept
in memory while they fit in the cache (`cache_gb`); the other bags keep only their coords and
instance labels and read their features from the source whenever they are used (`Bag.features`),
so a cohort larger than memory trains in bounded memory, with the same batches and results.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi.errors import CohortError

from .labels import class_mapping, labels_digest, read_labels_csv
from .sources import BagReader, FeatureSource, H5Features, StoreFeatures, _as_features, feature_source  # noqa: F401

log = logging.getLogger(__name__)

_LIST = 10  # ids named in a message before "..."
GIB = 1 << 30


def name_ids(ids: list[str]) -> str:
    """At most ten ids, comma-separated, then how many more."""
    return ", ".join(ids[:_LIST]) + (f", ... ({len(ids) - _LIST} more)" if len(ids) > _LIST else "")


# ---- bags and cohorts ----------------------------------------------------------------------------
class Bag:
    """One slide: label, coords, instance labels and its (N, D) features, either held in memory or
    read through `reader` (the cohort's `BagReader`) each time `features` is used. `n_instances` and
    `dim` never read features."""

    def __init__(self, slide_id: str, patient_id: str, label: int, features: np.ndarray | None,
                 coords: np.ndarray, instance_labels: np.ndarray | None = None, reader: "BagReader | None" = None):
        if features is None and reader is None:
            raise ValueError(f"bag {slide_id!r}: give its features or a reader of them")
        self.slide_id, self.patient_id, self.label = slide_id, patient_id, label   # label: index into class_names
        self.coords = coords                            # (N, 2) int64 level-0 top-left x, y
        self.instance_labels = instance_labels          # (N,) float32 in [0, 1] (tile positive if > 0.5), or None
        self.reader = reader
        self._features = features                       # (N, D) float32 or float16 (as stored), or None
        self.revision = 0                               # bumped when features are replaced (fingerprint cache)

    def __repr__(self) -> str:
        where = "in memory" if self.held else "read from its source"
        return f"Bag({self.slide_id!r}, label {self.label}, {self.n_instances} x {self.dim}, {where})"

    @property
    def features(self) -> np.ndarray:
        """(N, D) float32 or float16, as stored: the held array, else read from the source (a new array)."""
        return self._features if self._features is not None else self.reader.read(self.slide_id)

    @features.setter
    def features(self, value: np.ndarray) -> None:
        self._features = value
        self.revision += 1

    @property
    def held(self) -> bool:
        """Whether the features are in memory (cached), not read from the source on each use."""
        return self._features is not None

    @property
    def n_instances(self) -> int:
        return len(self._features) if self._features is not None else self.reader.shape(self.slide_id)[0]

    @property
    def dim(self) -> int:
        return int(self._features.shape[1]) if self._features is not None else self.reader.shape(self.slide_id)[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the features in memory (held or not)."""
        f = self._features
        return int(f.nbytes) if f is not None else self.reader.nbytes(self.slide_id)


class LazyFeatures:
    """A bag's features as an array-like that reads them only when its values are used: len() and
    `shape` cost nothing, indexing or np.asarray() read the bag (held: no read). For code that takes a
    list of feature arrays but visits one at a time (mil.w2s.negative_evidence)."""

    def __init__(self, bag: Bag):
        self.bag = bag

    def __len__(self) -> int:
        return self.bag.n_instances

    @property
    def shape(self) -> tuple[int, int]:
        return (self.bag.n_instances, self.bag.dim)

    def __getitem__(self, key) -> np.ndarray:
        return self.bag.features[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        f = self.bag.features
        return f if dtype is None else f.astype(dtype, copy=False)


def _hash_bag(h, b: Bag, label_name: str, split: str, feats: np.ndarray) -> None:
    h.update(repr((b.slide_id, b.patient_id, label_name, split, feats.shape, str(feats.dtype))).encode())
    for a in (feats, b.coords, b.instance_labels):
        if a is not None:
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))


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
    # sha256 of the features etc. as load_cohort read them, with the bags (and revisions) it covers
    features_sha256: tuple[tuple, str] | None = None

    @property
    def dim(self) -> int:
        return self.bags[0].dim

    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags], dtype=np.int64)

    def patients(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags], dtype=object)

    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]

    def memory(self) -> tuple[int, int]:
        """(bytes of features held in memory, bytes of all the bags' features)."""
        return sum(b.nbytes for b in self.bags if b.held), sum(b.nbytes for b in self.bags)

    def _digest_key(self) -> tuple:
        return tuple((id(b), b.revision) for b in self.bags)

    def fingerprint(self) -> dict[str, Any]:
        """What the cohort was made of: the labels CSV (path, sha256) and the feature source (kind,
        resolved path, encoder, slide count, and a sha256 over every bag's id, patient, label, split,
        features, coords and instance labels). load_cohort hashes the bags as it reads them; a cohort
        built or changed in memory is hashed here (about 2 GB/s)."""
        if self.features_sha256 is not None and self.features_sha256[0] == self._digest_key():
            digest = self.features_sha256[1]
        else:
            h = hashlib.sha256()
            for i, b in enumerate(self.bags):
                _hash_bag(h, b, self.class_names[b.label], self.csv_split[i] if self.csv_split is not None else "",
                          b.features)
            digest = h.hexdigest()
        local = self.source_kind is not None
        return {"labels_csv": str(Path(self.labels_csv).resolve()) if self.labels_csv else None,
                "labels_sha256": self.labels_sha256,
                "features": {"kind": self.source_kind or "memory",
                             "path": str(Path(self.source).resolve()) if local else self.source,
                             "encoder": self.encoder, "slides": len(self.bags), "sha256": digest}}


# ---- the cache budget ----------------------------------------------------------------------------
def _memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes (v2, then v1), None when unlimited or unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_cache_gb() -> float:
    """The default feature cache: a quarter of the machine's memory (or of the container's limit),
    and at most half of what is available now, in GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * GIB
    limit = _memory_limit()
    total = min(total, limit) if limit else total
    avail = _available()
    return min(total / 4, avail / 2 if avail else total) / GIB


# ---- loading -------------------------------------------------------------------------------------
def load_cohort(labels_csv: str | Path, *, store=None, h5_dir: str | Path | None = None, encoder: str,
                instance_labels: str | None = None, classes: list[str] | None = None,
                positive: str | None = None, progress: bool = True, source: FeatureSource | None = None,
                cache_gb: float | None = None) -> Cohort:
    """Bags of the slides in `labels_csv` that have `encoder` features in `store` (a TileStore or its
    path) or in the CLAM / TRIDENT folder `h5_dir` (exactly one of the two; or a ready `source`).
    Slides without features and slides with features but no CSV row are each named in one warning.

    Every bag is read once, here; bags stay in memory, in CSV order, while their features fit in
    `cache_gb` GiB (default `default_cache_gb()`; 0 keeps none), the others read theirs from the
    source whenever they are used. Features keep their stored dtype (float16 stays float16)."""
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

    budget = (default_cache_gb() if cache_gb is None else max(0.0, float(cache_gb))) * GIB
    reader = BagReader(source)
    h = hashlib.sha256()
    loaded, empty, no_labels, dims = [], [], [], set()
    held = 0
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
        reader.record(r.slide_id, feats)
        dims.add(feats.shape[1])
        keep = held + feats.nbytes <= budget          # first fit, in CSV order: never evicted later
        held += feats.nbytes if keep else 0
        bag = Bag(r.slide_id, r.patient_id, -1, feats if keep else None, np.asarray(coords, dtype=np.int64), inst,
                  reader=reader)
        _hash_bag(h, bag, r.label, r.split or "", feats)   # as Cohort.fingerprint would, without a second read
        loaded.append((r, bag))
        del feats
    if empty:
        log.warning("%d slides have 0 tiles and are left out: %s", len(empty), name_ids(empty))
    if no_labels:
        log.warning("%d of %d slides have no %r instance labels (their instance metrics are skipped): %s",
                    len(no_labels), len(loaded), instance_labels, name_ids(no_labels))
    if not loaded:
        raise CohortError(f"{where}: every slide of {labels_csv} with features has 0 tiles; tile them again")
    if len(dims) > 1:
        raise CohortError(f"{where}: {source.encoder!r} features of different widths {sorted(dims)}; re-embed the "
                          "slides with one encoder")
    names, pos = class_mapping([r.label for r, _ in loaded], classes=classes, positive=positive,
                               where=str(labels_csv))
    present = sorted({r.label for r, _ in loaded})
    if len(present) < 2:
        raise CohortError(f"{labels_csv}: every slide with features has label {present[0]!r}; MIL needs at least "
                          "two classes: add slides of another class or embed the missing ones")
    index = {n: i for i, n in enumerate(names)}
    for r, bag in loaded:
        bag.label = index[r.label]
    bags = [bag for _, bag in loaded]
    csv_split = [r.split for r, _ in loaded] if loaded[0][0].split is not None else None
    cohort = Cohort(bags, names, pos, source.encoder, source.path, csv_split, str(labels_csv),
                    source_kind=source.kind, labels_sha256=digest)
    cohort.features_sha256 = (cohort._digest_key(), h.hexdigest())
    kept, total = cohort.memory()
    log.info("%d bags, %.2f GiB of features: %.2f GiB held in memory (cache %.2f GiB)%s", len(bags), total / GIB,
             kept / GIB, budget / GIB, "" if kept == total else
             f", the other {sum(not b.held for b in bags)} bags read from {where} when used")
    return cohort
