"""Bags for MIL: a labels CSV joined with features from the tile store or a CLAM / TRIDENT h5 folder,
patient-level splits, and padded size-bucketed mini-batches.

Labels CSV (comma-separated, one row per slide):

    slide_id,label[,patient_id][,split]      patient_id defaults to slide_id; split is train/val/test

Splits are always by patient: a patient's slides share a label (a conflict is an error) and land in
one part, so no patient is ever seen in training and scored in test.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are built, not at CLI start-up
    import torch

log = logging.getLogger(__name__)

PARTS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}
# Names that read as the negative class of a binary task (compared lower-cased, '_' and ' ' as '-').
_NEGATIVE = {"normal", "negative", "neg", "benign", "healthy", "0", "false", "no", "none", "absent", "control",
             "non-tumor", "non-tumour", "nontumor", "nontumour", "tumor-free", "tumour-free", "non-cancer",
             "noncancer", "non-malignant", "nonmalignant", "non-neoplastic", "wild-type", "wildtype", "wt"}
_LIST = 10  # ids named in a warning before "..."


# ---- data classes ---------------------------------------------------------------------------------
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
    source: str                             # store path or h5 folder
    csv_split: list[str] | None = None      # per bag "train" / "val" / "test" from the CSV, or None
    labels_csv: str | None = None

    @property
    def dim(self) -> int:
        return int(self.bags[0].features.shape[1])

    def labels(self) -> np.ndarray:
        return np.array([b.label for b in self.bags], dtype=np.int64)

    def patients(self) -> np.ndarray:
        return np.array([b.patient_id for b in self.bags], dtype=object)

    def slide_ids(self) -> list[str]:
        return [b.slide_id for b in self.bags]


@dataclass
class Split:
    fold: int
    train: list[int]                        # indices into cohort.bags, sorted
    val: list[int]
    test: list[int]


@dataclass
class _Row:
    slide_id: str
    patient_id: str
    label: str
    split: str | None
    line: int


def _ids(ids: list[str]) -> str:
    return ", ".join(ids[:_LIST]) + (f", ... ({len(ids) - _LIST} more)" if len(ids) > _LIST else "")


# ---- labels CSV ------------------------------------------------------------------------------------
def read_labels_csv(path: str | Path) -> list[_Row]:
    """Rows of a labels CSV, validated; every problem is a one-line ValueError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels CSV; give a CSV with columns slide_id,label "
                                "(optional patient_id, split)")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):   # blank lines before the header
            header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file; write a header slide_id,label (optional patient_id, split) "
                             "and one row per slide")
        cols = [c.strip().lower() for c in header]
        missing = [c for c in ("slide_id", "label") if c not in cols]
        if missing:
            hint = ""
            if len(header) == 1 and any(s in header[0] for s in (";", "\t")):
                hint = " (it looks separated by ';' or tabs: save it comma-separated)"
            raise ValueError(f"{path}: no {' or '.join(repr(m) for m in missing)} column in the header "
                             f"{','.join(c.strip() for c in header)!r}{hint}; the header must contain slide_id,label")
        dup = sorted({c for c in cols if c and cols.count(c) > 1})
        if dup:
            raise ValueError(f"{path}: column {dup[0]!r} appears more than once in the header; keep one")
        at = {c: cols.index(c) for c in ("slide_id", "label", "patient_id", "split") if c in cols}
        rows: list[_Row] = []
        seen: dict[str, int] = {}
        for rec in reader:
            line = reader.line_num
            if not any(c.strip() for c in rec):
                continue
            get = lambda c: rec[at[c]].strip() if c in at and at[c] < len(rec) else ""  # noqa: E731
            sid, label = get("slide_id"), get("label")
            if not sid:
                raise ValueError(f"{path}: line {line} has no slide_id; fill it in or delete the row")
            if not label:
                raise ValueError(f"{path}: line {line} (slide {sid!r}) has no label; fill it in or delete the row")
            if sid in seen:
                raise ValueError(f"{path}: slide_id {sid!r} appears twice (lines {seen[sid]} and {line}); "
                                 "keep one row per slide")
            seen[sid] = line
            part = None
            if "split" in at:
                raw = get("split")
                part = _SPLIT_ALIASES.get(raw.lower())
                if part is None:
                    raise ValueError(f"{path}: line {line} (slide {sid!r}) has split {raw!r}; "
                                     "use train, val or test (or drop the split column)")
            rows.append(_Row(sid, get("patient_id") or sid, label, part, line))
    if not rows:
        raise ValueError(f"{path}: a header but no rows; add one row per slide (slide_id,label)")
    first: dict[str, _Row] = {}
    for r in rows:
        o = first.setdefault(r.patient_id, r)
        if o.label != r.label:
            raise ValueError(f"{path}: patient {r.patient_id!r} has slides with different labels ({o.slide_id!r}: "
                             f"{o.label!r}, line {o.line}; {r.slide_id!r}: {r.label!r}, line {r.line}); splits are "
                             "made per patient, so correct the labels or give the slides different patient_id")
    return rows


def _is_negative(name: str) -> bool:
    return name.strip().lower().replace("_", "-").replace(" ", "-") in _NEGATIVE


def _sort_names(names: set[str]) -> list[str]:
    try:  # "2" before "10" when every label is an integer
        return sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        return sorted(names)


def class_mapping(labels: list[str], *, classes: list[str] | None = None, positive: str | None = None,
                  where: str = "labels") -> tuple[list[str], str | None]:
    """(class_names, positive_class). `classes` fixes the order; otherwise names are sorted and, with two
    classes, one that reads as negative (normal, benign, 0, ...) comes first. `positive` puts that class
    at index 1 of a binary task."""
    present = set(labels)
    if classes is not None:
        names = [str(c).strip() for c in classes]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"classes {names} has empty or repeated names; list each class once")
        outside = _sort_names(present - set(names))
        if outside:
            raise ValueError(f"{where}: labels {outside} are not among the classes given ({', '.join(names)}); "
                             "add them to --classes or fix those rows")
    else:
        names = _sort_names(present)
        if len(names) == 2:
            neg = [n for n in names if _is_negative(n)]
            if len(neg) == 1:
                names = [neg[0]] + [n for n in names if n != neg[0]]
    if positive is not None:
        positive = str(positive).strip()
        if positive not in names:
            raise ValueError(f"positive class {positive!r} is not a class of {where} ({', '.join(names)}); "
                             "give one of them to --positive")
        if len(names) != 2:
            raise ValueError(f"--positive applies to two classes; {where} has {len(names)} ({', '.join(names)})")
        if classes is not None and names[1] != positive:
            raise ValueError(f"--positive {positive} but --classes puts {names[1]!r} second (the positive index); "
                             "give one of the two, or list the positive class second")
        names = [n for n in names if n != positive] + [positive]
    return names, (names[1] if len(names) == 2 else None)


# ---- loading ---------------------------------------------------------------------------------------
def _store_labels(store, slide_id: str, name: str) -> np.ndarray | None:
    """Per-tile labels `labels/<name>` of a slide, None when absent."""
    if hasattr(store, "labels"):
        return store.labels(slide_id, name)
    g = store.slide(slide_id)  # stores without TileStore.labels: read the zarr array directly
    try:
        return g["labels"][name][:]
    except KeyError:
        return None


def _as_features(a: np.ndarray) -> np.ndarray:
    return a if a.dtype in (np.float32, np.float16) else a.astype(np.float32)


def load_cohort(labels_csv: str | Path, *, store=None, h5_dir: str | Path | None = None, encoder: str,
                instance_labels: str | None = None, classes: list[str] | None = None,
                positive: str | None = None, progress: bool = True) -> Cohort:
    """Bags of the slides in `labels_csv` that have `encoder` features in `store` (a TileStore or its
    path) or in the CLAM / TRIDENT folder `h5_dir` (exactly one of the two). Slides without features and
    slides with features but no CSV row are each named in one warning."""
    from tqdm.auto import tqdm

    if (store is None) == (h5_dir is None):
        raise ValueError("give exactly one of store (a tile store) or h5_dir (a CLAM / TRIDENT feature folder)")
    rows = read_labels_csv(labels_csv)
    if store is not None:
        from wsi.store import StoreError, TileStore

        if not isinstance(store, TileStore):
            try:
                store = TileStore(store, mode="r")
            except StoreError as e:
                raise ValueError(str(e)) from None
        source = str(store.path)
        have = [s for s in store.slide_ids() if store.has_features(s, encoder)]
        avail: dict[str, Any] = {s: s for s in have}
        where = f"{source} (features {encoder!r})"
    else:
        if instance_labels:
            raise ValueError(f"instance labels {instance_labels!r} live in a tile store, not in h5 files; import the "
                             f"h5 folder with `wsi import-h5 {h5_dir} --store STORE --encoder {encoder}`, pass --store")
        from wsi.interop import h5_feature_files, read_h5_bag

        source = str(h5_dir)
        avail = h5_feature_files(h5_dir, encoder)
        where = f"{source}"
    wanted = {r.slide_id for r in rows}
    missing = [r.slide_id for r in rows if r.slide_id not in avail]
    unlabelled = sorted(s for s in avail if s not in wanted)
    if missing:
        log.warning("%d of %d slides in %s have no %r features in %s and are left out: %s", len(missing), len(rows),
                    labels_csv, encoder, where, _ids(missing))
    if unlabelled:
        log.warning("%d slides with features in %s have no row in %s and are left out: %s", len(unlabelled),
                    where, labels_csv, _ids(unlabelled))
    todo = [r for r in rows if r.slide_id in avail]
    if not todo:
        raise ValueError(f"{labels_csv}: none of its {len(rows)} slides has {encoder!r} features in {where}; "
                         "check the slide ids and --encoder")

    loaded: list[tuple[_Row, np.ndarray, np.ndarray, np.ndarray | None]] = []
    empty, no_labels = [], []
    for r in tqdm(todo, desc="load bags", unit="slide", disable=not progress):
        if store is not None:
            feats, coords = _as_features(store.features(r.slide_id, encoder)), store.coords(r.slide_id)
        else:
            feats, coords = read_h5_bag(avail[r.slide_id])
            feats = _as_features(feats)
        if len(feats) == 0:
            empty.append(r.slide_id)
            continue
        inst = None
        if instance_labels:
            inst = _store_labels(store, r.slide_id, instance_labels)
            if inst is None:
                no_labels.append(r.slide_id)
            else:
                inst = np.asarray(inst, dtype=np.float32).reshape(-1)
                if len(inst) != len(feats):
                    raise ValueError(f"{source}: slide {r.slide_id!r} has {len(inst)} {instance_labels!r} labels "
                                     f"for {len(feats)} tiles; write its labels again for the current tiles")
        loaded.append((r, feats, np.asarray(coords, dtype=np.int64), inst))
    if empty:
        log.warning("%d slides have 0 tiles and are left out: %s", len(empty), _ids(empty))
    if no_labels:
        log.warning("%d of %d slides have no %r instance labels (their instance metrics are skipped): %s",
                    len(no_labels), len(loaded), instance_labels, _ids(no_labels))
    dims = {f.shape[1] for _, f, _, _ in loaded}
    if len(dims) > 1:
        raise ValueError(f"{where}: {encoder!r} features of different widths {sorted(dims)}; re-embed the "
                         "slides with one encoder")
    names, pos = class_mapping([r.label for r, *_ in loaded], classes=classes, positive=positive,
                               where=str(labels_csv))
    present = sorted({r.label for r, *_ in loaded})
    if len(present) < 2:
        raise ValueError(f"{labels_csv}: every slide with features has label {present[0]!r}; MIL needs at least "
                         "two classes: add slides of another class or embed the missing ones")
    index = {n: i for i, n in enumerate(names)}
    bags = [Bag(r.slide_id, r.patient_id, index[r.label], f, c, inst) for r, f, c, inst in loaded]
    csv_split = [r.split for r, *_ in loaded] if loaded[0][0].split is not None else None
    return Cohort(bags, names, pos, encoder, source, csv_split, str(labels_csv))


# ---- splits ----------------------------------------------------------------------------------------
def _patient_table(cohort: Cohort) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]]]:
    """(patient ids, their labels, bag indices by patient), patients in first-seen order."""
    by: dict[str, list[int]] = {}
    for i, b in enumerate(cohort.bags):
        by.setdefault(b.patient_id, []).append(i)
    pats = np.array(list(by), dtype=object)
    labels = np.array([cohort.bags[by[p][0]].label for p in pats], dtype=np.int64)
    return pats, labels, by


def _stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of about `n` of `labels`, class proportions kept (largest remainder), at least one of
    each class that has two or more (when n > 0), never every member of a class."""
    if n <= 0 or len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    cls, counts = np.unique(labels, return_counts=True)
    ideal = n * counts / counts.sum()
    alloc = np.floor(ideal).astype(int)
    rest = n - alloc.sum()
    if rest > 0:
        frac = ideal - alloc + rng.uniform(0, 1e-6, len(cls))   # tiny noise: ties broken by the seed
        alloc[np.argsort(-frac)[:rest]] += 1
    alloc = np.where(counts >= 2, np.maximum(alloc, 1), 0)
    alloc = np.minimum(alloc, counts - 1)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(cls, alloc)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _n_val(val_fraction: float, n_patients: int) -> int:
    # any val_fraction > 0 asks for a validation part, however small the cohort
    return max(1, int(round(val_fraction * n_patients))) if val_fraction > 0 else 0


def _bags_of(pats: np.ndarray, by: dict[str, list[int]]) -> list[int]:
    return sorted(i for p in pats for i in by[p])


def _check_split(cohort: Cohort, s: Split) -> None:
    owner: dict[str, str] = {}
    for part in PARTS:
        for i in getattr(s, part):
            p = cohort.bags[i].patient_id
            if owner.setdefault(p, part) != part:
                raise RuntimeError(f"fold {s.fold}: patient {p!r} in both {owner[p]} and {part} (a pathmil bug)")


def _csv_split(cohort: Cohort, val_fraction: float, seed: int) -> Split:
    parts: dict[str, list[int]] = {p: [] for p in PARTS}
    owner: dict[str, tuple[str, str]] = {}
    for i, (b, part) in enumerate(zip(cohort.bags, cohort.csv_split)):
        o = owner.setdefault(b.patient_id, (part, b.slide_id))
        if o[0] != part:
            raise ValueError(f"{cohort.labels_csv}: patient {b.patient_id!r} has slides in {o[0]} ({o[1]!r}) and "
                             f"{part} ({b.slide_id!r}); put all of a patient's slides in one part of the split column")
        parts[part].append(i)
    for need in ("train", "test"):
        if not parts[need]:
            raise ValueError(f"{cohort.labels_csv}: the split column puts no slide with features in {need}; "
                             f"mark some rows {need}, or drop the column to make folds")
    if not parts["val"] and val_fraction > 0:
        sub = Cohort([cohort.bags[i] for i in parts["train"]], cohort.class_names, cohort.positive_class,
                     cohort.encoder, cohort.source)
        pats, labels, by = _patient_table(sub)
        n_all = len({b.patient_id for b in cohort.bags})
        pick = _stratified_pick(labels, _n_val(val_fraction, n_all), np.random.default_rng(seed))
        val = {parts["train"][i] for i in _bags_of(pats[pick], by)}
        parts["val"] = sorted(val)
        parts["train"] = [i for i in parts["train"] if i not in val]
        log.info("the split column has no val rows: %d train slides (%d patients) moved to val",
                 len(val), len(pick))
    return Split(0, parts["train"], parts["val"], parts["test"])


def make_splits(cohort: Cohort, folds: int = 5, *, val_fraction: float = 0.15, seed: int = 0,
                use_csv_split: bool = True) -> list[Split]:
    """Patient-level splits: the CSV's split column (one fold) when it has one and `use_csv_split`;
    else `folds` >= 2 stratified folds (each slide tested exactly once; val is `val_fraction` of all
    patients, taken stratified from the rest), or with folds=1 one stratified train/val/test split
    (test 20%). No patient is ever in two parts."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if use_csv_split and cohort.csv_split is not None:
        if folds != 1:
            log.info("using the split column of %s (one fold; folds=%d not used)", cohort.labels_csv, folds)
        splits = [_csv_split(cohort, val_fraction, seed)]
    else:
        if folds < 1:
            raise ValueError(f"folds must be at least 1, got {folds}")
        pats, labels, by = _patient_table(cohort)
        n_val = _n_val(val_fraction, len(pats))
        need = max(folds, 2)
        for c, name in enumerate(cohort.class_names):
            k = int((labels == c).sum())
            if 0 < k < need:
                has = f"class {name!r} has {k} patient{'s' * (k != 1)}"
                if folds >= 2 and k >= 2:
                    raise ValueError(f"{has}, fewer than --folds {folds}; use --folds {k} or fewer")
                raise ValueError(f"{has}; a train/test split needs at least 2 of each class: add patients "
                                 "of that class or drop it from the labels CSV")
        if folds == 1:
            rng = np.random.default_rng(seed)
            test = _stratified_pick(labels, max(1, int(round(0.2 * len(pats)))), rng)
            rest = np.setdiff1d(np.arange(len(pats)), test)
            folds_idx = [(rest, test)]
        else:
            from sklearn.model_selection import StratifiedKFold

            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            folds_idx = list(skf.split(np.zeros(len(pats)), labels))
        splits = []
        for k, (rest, test) in enumerate(folds_idx):
            v = _stratified_pick(labels[rest], n_val, np.random.default_rng([seed, k]))
            val = rest[v]
            train = np.setdiff1d(rest, val)
            splits.append(Split(k, _bags_of(pats[train], by), _bags_of(pats[val], by), _bags_of(pats[test], by)))
    for s in splits:
        _check_split(cohort, s)
    return splits


def write_splits(cohort: Cohort, splits: list[Split], out_dir: str | Path) -> Path:
    """out_dir/splits/fold_<k>.csv (slide_id, patient_id, label name, part) for each split; returns the folder."""
    d = Path(out_dir) / "splits"
    d.mkdir(parents=True, exist_ok=True)
    for s in splits:
        with (d / f"fold_{s.fold}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "patient_id", "label", "part"])
            for part in PARTS:
                for i in getattr(s, part):
                    b = cohort.bags[i]
                    w.writerow([b.slide_id, b.patient_id, cohort.class_names[b.label], part])
    return d


# ---- batches ---------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: "torch.Tensor"                       # (B, Nmax, D) float32, 0 at padding
    mask: "torch.Tensor"                    # (B, Nmax) bool, True = real instance
    y: "torch.Tensor"                       # (B,) long
    index: list[int]                        # positions in the bags list given to the batcher
    instance_labels: "torch.Tensor | None" = None   # (B, Nmax) float32, 0 at padding
    selected: list[np.ndarray | None] = field(default_factory=list)  # kept instance indices (None: all)


class BagBatcher:
    """Padded, size-bucketed mini-batches from bags held in memory.

    Each pass (epoch) with shuffle: bags above `max_instances` are subsampled afresh (kept indices
    sorted), bags are ordered by size with a little seeded noise and cut into batches (so padding
    stays small), and the batch order is shuffled. Every pass differs and is reproducible from `seed`
    and the pass number. With shuffle=False the bags keep their order and every pass is identical."""

    SIZE_NOISE = 0.1    # relative jitter on sizes before bucketing: neighbours vary from epoch to epoch

    def __init__(self, bags: list[Bag], batch_size: int = 16, *, max_instances: int | None = None,
                 shuffle: bool = True, seed: int = 0, with_instance_labels: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be at least 1 (or None for whole bags), got {max_instances}")
        empty = [b.slide_id for b in bags if len(b.features) == 0]
        if empty:
            raise ValueError(f"bags without instances: {_ids(empty)}; leave those slides out")
        dims = {b.features.shape[1] for b in bags}
        if len(dims) > 1:
            raise ValueError(f"bags have different feature widths {sorted(dims)}; use features of one encoder")
        self.bags, self.batch_size, self.max_instances = bags, batch_size, max_instances
        self.shuffle, self.seed, self.with_instance_labels = shuffle, seed, with_instance_labels
        self.dim = dims.pop() if dims else 0
        self.sizes = np.array([len(b.features) for b in bags], dtype=np.int64)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.bags) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The pass the next iteration makes (to resume a run with the same batches)."""
        self.epoch = epoch

    def _selection(self, rng: np.random.Generator) -> list[np.ndarray | None]:
        m = self.max_instances
        if m is None:
            return [None] * len(self.bags)
        return [np.sort(rng.choice(n, m, replace=False)) if n > m else None for n in self.sizes]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        # shuffle=False: the same subsample every pass, so evaluation is deterministic
        rng = np.random.default_rng([self.seed, epoch] if self.shuffle else [self.seed])
        sel = self._selection(rng)
        n = len(self.bags)
        if self.shuffle:
            sizes = np.array([len(s) if s is not None else k for s, k in zip(sel, self.sizes)], dtype=np.float64)
            order = np.argsort(sizes * np.exp(rng.uniform(-self.SIZE_NOISE, self.SIZE_NOISE, n)), kind="stable")
            chunks = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        else:
            chunks = [np.arange(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        for idx in chunks:
            yield self._build([int(i) for i in idx], [sel[i] for i in idx])

    def _build(self, idx: list[int], sel: list[np.ndarray | None]) -> Batch:
        import torch

        lens = [int(self.sizes[i]) if s is None else len(s) for i, s in zip(idx, sel)]
        B, nmax = len(idx), max(lens)
        # Filled in numpy (single-threaded memcpy-speed copies, float16 -> float32 on assignment): torch's
        # intra-op threads only slow plain copies down on a busy CPU. np.empty + zeroing just the
        # padding writes each byte once.
        f0 = self.bags[idx[0]].features
        # One whole float32 bag: a view, not a copy (a 200,000 x 1024 bag is 0.8 GB).
        view = B == 1 and sel[0] is None and f0.dtype == np.float32 and f0.flags.c_contiguous
        x = f0[None] if view else np.empty((B, nmax, self.dim), dtype=np.float32)
        mask = np.zeros((B, nmax), dtype=bool)
        for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
            if view:
                mask[r, :k] = True
                continue
            f = self.bags[i].features
            x[r, :k] = f if s is None else f[s]     # (gather then copy beats np.take(out=) here)
            x[r, k:] = 0
            mask[r, :k] = True
        y = torch.tensor([self.bags[i].label for i in idx], dtype=torch.long)
        inst = None
        if self.with_instance_labels and all(self.bags[i].instance_labels is not None for i in idx):
            lab = np.zeros((B, nmax), dtype=np.float32)
            for r, (i, s, k) in enumerate(zip(idx, sel, lens)):
                il = self.bags[i].instance_labels
                lab[r, :k] = il if s is None else il[s]
            inst = torch.from_numpy(lab)
        return Batch(torch.from_numpy(x), torch.from_numpy(mask), y, idx, inst, list(sel))
