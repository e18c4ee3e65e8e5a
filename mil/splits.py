"""Patient-level train / val / test splits of a cohort, and their CSV record in a run folder.

Splits are always by patient: a patient's slides land in one part, so no patient is ever seen in
training and scored in test. The labels CSV's split column, when present, is one fixed split;
otherwise stratified k-fold (or one stratified split with folds=1), with the splitters of `wsi.splits`
that clip's splits use too.

A patient may have slides of different labels (a tumour and a normal slide). Patients are then
stratified by their set of labels, as CLAM's patient-level stratification does: the stratum of a
patient with a tumour and a normal slide is "normal+tumor". A stratum held by too few patients to
reach every fold is stratified with the largest stratum that shares a label with it. A cohort where
every patient has one label gets the same folds as plain label stratification. Bag metrics stay per
slide; the split files record each slide's patient, the patient's labels and the stratum used.
"""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wsi.errors import LabelsError
from wsi.splits import stratified_folds, stratified_pick

from .cohort import Cohort
from .labels import PARTS

log = logging.getLogger(__name__)


@dataclass
class Split:
    fold: int
    train: list[int]                        # indices into cohort.bags, sorted
    val: list[int]
    test: list[int]
    strata: dict[str, tuple[int, ...]] = field(default_factory=dict)   # patient -> label set it was stratified by
    from_csv: bool = False                  # the labels CSV's split column made it


def patient_label_sets(cohort: Cohort) -> dict[str, tuple[int, ...]]:
    """Each patient's sorted set of slide labels (class indices), patients in first-seen order."""
    sets: dict[str, set[int]] = {}
    for b in cohort.bags:
        sets.setdefault(b.patient_id, set()).add(b.label)
    return {p: tuple(sorted(v)) for p, v in sets.items()}


def stratum_name(key: tuple[int, ...], class_names: list[str]) -> str:
    """"normal+tumor" for a patient with slides of both classes."""
    return "+".join(class_names[c] for c in key)


def _merge_small(keys: list[tuple[int, ...]], need: int) -> list[tuple[int, ...]]:
    """Label sets held by fewer than `need` patients joined to the largest set sharing a label with them
    (ties: the set with the higher labels), smallest first, until every set can reach `need` folds.
    A set with a label always finds one: make_splits has checked that each class has `need` patients."""
    keys = list(keys)
    while True:
        counts = Counter(keys)
        small = sorted((k for k in counts if counts[k] < need), key=lambda k: (counts[k], k))
        if not small or len(counts) < 2:
            return keys
        k = small[0]
        near = [o for o in counts if o != k and set(o) & set(k)] or [o for o in counts if o != k]
        into = max(near, key=lambda o: (counts[o], o))
        keys = [into if x == k else x for x in keys]


def _codes(keys: list[tuple[int, ...]], n_classes: int) -> np.ndarray:
    """Integer stratum codes: a single label keeps its class index (so a cohort of one-label patients is
    stratified exactly as by label), each set of several labels gets a code after the classes."""
    mixed = sorted({k for k in keys if len(k) > 1})
    code = {k: n_classes + i for i, k in enumerate(mixed)}
    return np.array([k[0] if len(k) == 1 else code[k] for k in keys], dtype=np.int64)


def _patient_table(cohort: Cohort, need: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, list[int]],
                                                            list[tuple[int, ...]]]:
    """(patient ids, their stratum codes, bag indices by patient, the label set each patient is
    stratified by), patients in first-seen order. Sets held by fewer than `need` patients are merged."""
    by: dict[str, list[int]] = {}
    for i, b in enumerate(cohort.bags):
        by.setdefault(b.patient_id, []).append(i)
    sets = patient_label_sets(cohort)
    pats = np.array(list(by), dtype=object)
    keys = _merge_small([sets[p] for p in pats], need)
    return pats, _codes(keys, len(cohort.class_names)), by, keys


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
        pats, codes, by, _ = _patient_table(sub, 2)
        n_all = len({b.patient_id for b in cohort.bags})
        pick = stratified_pick(codes, _n_val(val_fraction, n_all), np.random.default_rng(seed))
        val = {parts["train"][i] for i in _bags_of(pats[pick], by)}
        parts["val"] = sorted(val)
        parts["train"] = [i for i in parts["train"] if i not in val]
        log.info("the split column has no val rows: %d train slides (%d patients) moved to val",
                 len(val), len(pick))
    return Split(0, parts["train"], parts["val"], parts["test"], patient_label_sets(cohort), from_csv=True)


def make_splits(cohort: Cohort, folds: int = 5, *, val_fraction: float = 0.15, seed: int = 0,
                use_csv_split: bool = True) -> list[Split]:
    """Patient-level splits: the CSV's split column (one fold) when it has one and `use_csv_split`;
    else `folds` >= 2 stratified folds (each slide tested exactly once; val is `val_fraction` of all
    patients, taken stratified from the rest), or with folds=1 one stratified train/val/test split
    (test 20%). No patient is ever in two parts. Patients are stratified by their set of slide labels
    (see the module docstring), which is their label when all their slides share one."""
    if not 0 <= val_fraction < 1:
        raise LabelsError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if use_csv_split and cohort.csv_split is not None:
        if folds != 1:
            log.info("using the split column of %s (one fold; folds=%d not used)", cohort.labels_csv, folds)
        splits = [_csv_split(cohort, val_fraction, seed)]
    else:
        if folds < 1:
            raise LabelsError(f"folds must be at least 1, got {folds}")
        need = max(folds, 2)
        sets = patient_label_sets(cohort)
        for c, name in enumerate(cohort.class_names):
            k = sum(c in v for v in sets.values())
            if 0 < k < need:
                has = f"class {name!r} has {k} patient{'s' * (k != 1)}"
                if folds >= 2 and k >= 2:
                    raise LabelsError(f"{has}, fewer than --folds {folds}; use --folds {k} or fewer")
                raise LabelsError(f"{has}; a train/test split needs at least 2 of each class: add patients "
                                  "of that class or drop it from the labels CSV")
        pats, codes, by, keys = _patient_table(cohort, need)
        n_val = _n_val(val_fraction, len(pats))
        mixed = [p for p in pats if len(sets[p]) > 1]
        if mixed:
            merged = sorted({stratum_name(sets[p], cohort.class_names) for p, k in zip(pats, keys) if sets[p] != k})
            log.info("%d patients have slides of different labels (e.g. %r: %s); each patient's slides stay in one "
                     "part, patients stratified by their set of labels%s", len(mixed), mixed[0],
                     stratum_name(sets[mixed[0]], cohort.class_names),
                     f" ({', '.join(merged)}: too few patients, stratified with a larger set)" if merged else "")
        strata = dict(zip(pats, keys))
        if folds == 1:
            rng = np.random.default_rng(seed)
            test = stratified_pick(codes, max(1, int(round(0.2 * len(pats)))), rng)
            rest = np.setdiff1d(np.arange(len(pats)), test)
            folds_idx = [(rest, test)]
        else:
            folds_idx = stratified_folds(codes, folds, seed)
        splits = []
        for k, (rest, test) in enumerate(folds_idx):
            v = stratified_pick(codes[rest], n_val, np.random.default_rng([seed, k]))
            val = rest[v]
            train = np.setdiff1d(rest, val)
            splits.append(Split(k, _bags_of(pats[train], by), _bags_of(pats[val], by), _bags_of(pats[test], by),
                                strata))
    for s in splits:
        _check_split(cohort, s)
    return splits


def write_splits(cohort: Cohort, splits: list[Split], out_dir: str | Path) -> Path:
    """out_dir/splits/fold_<k>.csv (slide_id, patient_id, label name, part, patient_labels: the patient's
    set of labels, stratum: the set it was stratified by) for each split, and splits/README.txt saying
    how the splits were made with each fold's patients per stratum and part; returns the folder."""
    d = Path(out_dir) / "splits"
    d.mkdir(parents=True, exist_ok=True)
    sets = patient_label_sets(cohort)
    names = cohort.class_names
    for s in splits:
        with (d / f"fold_{s.fold}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["slide_id", "patient_id", "label", "part", "patient_labels", "stratum"])
            for part in PARTS:
                for i in getattr(s, part):
                    b = cohort.bags[i]
                    own = sets[b.patient_id]
                    w.writerow([b.slide_id, b.patient_id, names[b.label], part, stratum_name(own, names),
                                stratum_name(s.strata.get(b.patient_id, own), names)])
    (d / "README.txt").write_text(_splits_note(cohort, splits, sets), encoding="utf-8")
    return d


def _splits_note(cohort: Cohort, splits: list[Split], sets: dict[str, tuple[int, ...]]) -> str:
    names = cohort.class_names
    mixed = [p for p, v in sets.items() if len(v) > 1]
    how = "the split column of the labels CSV" if any(s.from_csv for s in splits) else "stratified folds"
    lines = [f"Splits by patient ({how}): every slide of a patient is in one part (train / val / test) of each "
             "fold, so no patient is both trained on and tested on.",
             "Patients are stratified by their set of slide labels (column patient_labels); a set held by too few "
             "patients is stratified with the largest set sharing a label (column stratum).",
             "Labels and bag metrics are per slide.",
             f"{len(sets)} patients, {len(cohort.bags)} slides; {len(mixed)} patients have slides of different "
             f"labels" + (f" ({', '.join(mixed[:10])}{', ...' if len(mixed) > 10 else ''})." if mixed else "."),
             "", "patients per stratum and part:"]
    for s in splits:
        per: dict[str, Counter] = {}
        for part in PARTS:
            for p in {cohort.bags[i].patient_id for i in getattr(s, part)}:
                per.setdefault(stratum_name(s.strata.get(p, sets[p]), names), Counter())[part] += 1
        cells = "; ".join(f"{k}: " + " / ".join(str(c[part]) for part in PARTS) for k, c in sorted(per.items()))
        lines.append(f"fold {s.fold} (train / val / test): {cells}")
    return "\n".join(lines) + "\n"
