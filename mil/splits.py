"""Patient-level train / val / test splits of a cohort, and their CSV record in a run folder.

Splits are always by patient: a patient's slides land in one part, so no patient is ever seen in
training and scored in test. The labels CSV's split column, when present, is one fixed split;
otherwise stratified k-fold (or one stratified split with folds=1).
"""
from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsi.errors import LabelsError

from .cohort import Cohort
from .labels import PARTS

log = logging.getLogger(__name__)


@dataclass
class Split:
    fold: int
    train: list[int]                        # indices into cohort.bags, sorted
    val: list[int]
    test: list[int]


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
            raise LabelsError(f"{cohort.labels_csv}: patient {b.patient_id!r} has slides in {o[0]} ({o[1]!r}) and "
                              f"{part} ({b.slide_id!r}); put all of a patient's slides in one part of the split "
                              "column")
        parts[part].append(i)
    for need in ("train", "test"):
        if not parts[need]:
            raise LabelsError(f"{cohort.labels_csv}: the split column puts no slide with features in {need}; "
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
        raise LabelsError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if use_csv_split and cohort.csv_split is not None:
        if folds != 1:
            log.info("using the split column of %s (one fold; folds=%d not used)", cohort.labels_csv, folds)
        splits = [_csv_split(cohort, val_fraction, seed)]
    else:
        if folds < 1:
            raise LabelsError(f"folds must be at least 1, got {folds}")
        pats, labels, by = _patient_table(cohort)
        n_val = _n_val(val_fraction, len(pats))
        need = max(folds, 2)
        for c, name in enumerate(cohort.class_names):
            k = int((labels == c).sum())
            if 0 < k < need:
                has = f"class {name!r} has {k} patient{'s' * (k != 1)}"
                if folds >= 2 and k >= 2:
                    raise LabelsError(f"{has}, fewer than --folds {folds}; use --folds {k} or fewer")
                raise LabelsError(f"{has}; a train/test split needs at least 2 of each class: add patients "
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
