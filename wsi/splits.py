"""Splits that keep a patient's (else a slide's) tiles and slides on one side, for every package.

`mil` makes patient-level stratified folds of a cohort with `stratified_folds` and `stratified_pick`;
`clip` (the validation split of `clip train`, the probe's held-out slides) uses `split_groups`; the
held-out slides of a labelled cohort (the demo's PathoCLIP and reasoner stages) come from
`split_by_label`. The group of a slide is its patient where a labels CSV says
(`read_patients`: `slide_id,...,patient_id`), else the slide itself, so two slides of one patient
never sit on both sides. The splitters are scikit-learn's (`GroupShuffleSplit`, `StratifiedKFold`
over one row per group).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from wsi.errors import LabelsError


def _labels_rows(labels_csv: str | Path, need: Sequence[str]) -> tuple[list[dict], dict[str, str]]:
    """The rows of a labels CSV and its columns by lower-case name; LabelsError (one line) when it cannot
    be read or lacks a column of `need`."""
    path = Path(labels_csv)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: cannot read the labels CSV ({type(e).__name__}); give a CSV with columns "
                          "slide_id,label[,patient_id]") from None
    cols = {c.strip().lower(): c for c in (rows[0].keys() if rows else [])}
    missing = [c for c in need if c not in cols]
    if missing:
        raise LabelsError(f"{path}: no {' or '.join(missing)} column; give a CSV with columns "
                          "slide_id,label[,patient_id]")
    return rows, cols


def read_patients(labels_csv: str | Path) -> dict[str, str]:
    """{slide_id: patient_id} of a labels CSV (`slide_id,label[,patient_id][,split]`); a row without a
    patient_id is its own patient. LabelsError (one line) when the file has no slide_id column."""
    rows, cols = _labels_rows(labels_csv, ["slide_id"])
    sid, pid = cols["slide_id"], cols.get("patient_id")
    out = {}
    for r in rows:
        s = (r.get(sid) or "").strip()
        if s:
            out[s] = ((r.get(pid) or "").strip() if pid else "") or s
    return out


def read_slide_labels(labels_csv: str | Path) -> dict[str, str]:
    """{slide_id: label} of a labels CSV (`slide_id,label[,patient_id][,split]`)."""
    rows, cols = _labels_rows(labels_csv, ["slide_id", "label"])
    return {r[cols["slide_id"]].strip(): (r[cols["label"]] or "").strip() for r in rows
            if (r[cols["slide_id"]] or "").strip()}


def split_by_label(labels: Mapping[str, str], test_fraction: float, seed: int = 0, *,
                   patients: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(train, test) slide ids, each sorted, stratified by label and whole patients on one side.

    A patient's stratum is the set of its slides' labels; in each stratum (in sorted order) the
    patients, sorted, are shuffled by one `np.random.default_rng(seed)` and max(1, round(n *
    test_fraction)) of them held out (at most n - 1; a stratum of one patient stays in training).
    With one slide per patient this is a plain per-label shuffle split of the slides."""
    if not 0 < test_fraction < 1:
        raise LabelsError(f"a held-out fraction must be in (0, 1), got {test_fraction}")
    owner = {s: (patients or {}).get(s, s) for s in labels}
    sets: dict[str, set[str]] = {}
    for s, p in owner.items():
        sets.setdefault(p, set()).add(labels[s])
    strata: dict[str, list[str]] = {}
    for p, labs in sets.items():
        strata.setdefault("+".join(sorted(labs)), []).append(p)
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    for key in sorted(strata):
        pats = sorted(strata[key])
        rng.shuffle(pats)
        k = min(len(pats) - 1, max(1, int(round(len(pats) * test_fraction))))
        held.update(pats[:k])
    test = sorted(s for s in labels if owner[s] in held)
    return sorted(s for s in labels if owner[s] not in held), test


def split_groups(groups: Sequence[str], test_fraction: float, seed: int = 0, *,
                 patients: Mapping[str, str] | None = None) -> tuple[list[int], list[int]]:
    """(train, test) positions of items whose group (slide id) is `groups[i]`, each sorted: whole groups,
    mapped to their patient by `patients` (a slide not in it is its own patient), go to one side.
    About `test_fraction` of the patients are held out, at least one on each side; scikit-learn's
    `GroupShuffleSplit` with `random_state=seed` draws them (deterministic, independent of the order of
    `groups`). LabelsError with fewer than two patients."""
    if not 0 < test_fraction < 1:
        raise LabelsError(f"a held-out fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import GroupShuffleSplit

    units = np.array([(patients or {}).get(g, g) for g in groups], dtype=object)
    n = len(set(units.tolist()))
    if n < 2:
        what = "patient" if patients else "slide"
        raise LabelsError(f"every item comes from one {what} ({units[0] if len(units) else 'none'!r}); a split by "
                          f"{what} needs two or more")
    n_test = min(n - 1, max(1, int(round(test_fraction * n))))
    gss = GroupShuffleSplit(n_splits=1, test_size=n_test, random_state=seed)
    train, test = next(gss.split(np.zeros(len(units)), groups=units.astype(str)))
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


def stratified_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of about `n` of `labels` (one per group), class proportions kept (largest remainder),
    at least one of each class that has two or more (when n > 0), never every member of a class."""
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


def stratified_folds(codes: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rest, test) positions of `folds` stratified folds over groups (one row per patient, `codes` its
    stratum): scikit-learn's `StratifiedKFold(shuffle=True, random_state=seed)`; every group is tested
    once."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(codes)), codes))
