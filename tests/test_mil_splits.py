"""mil.splits: patient-level stratified folds, the CSV split column, and their record in a run folder."""
from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from mil.cohort import Bag, Cohort
from mil.splits import make_splits, write_splits
from wsi.errors import LabelsError


def toy_cohort(n_patients: int = 30, pos_frac: float = 0.4, slides_per: int = 2, seed: int = 0,
               split: list[str] | None = None) -> Cohort:
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        y = int(p < pos_frac * n_patients)
        for s in range(1 + int(rng.integers(slides_per))):
            bags.append(Bag(f"s{p}_{s}", f"p{p}", y, np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64)))
    return Cohort(bags, ["normal", "tumor"], "tumor", "enc", "mem", split)


def _parts_by_patient(c: Cohort, s) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for part in ("train", "val", "test"):
        for i in getattr(s, part):
            out.setdefault(c.bags[i].patient_id, set()).add(part)
    return out


@pytest.mark.parametrize("folds", [1, 3, 5])
def test_kfold_patient_level_and_stratified(folds):
    for seed in range(15):
        c = toy_cohort(seed=seed)
        splits = make_splits(c, folds, seed=seed)
        assert [s.fold for s in splits] == list(range(folds))
        tested = Counter()
        n_pat = len(set(c.patients()))
        for s in splits:
            assert sorted(s.train + s.val + s.test) == list(range(len(c.bags)))
            assert all(len(v) == 1 for v in _parts_by_patient(c, s).values())
            assert s.train == sorted(s.train) and s.val and s.test
            tested.update(s.test)
            for part in (s.val, s.test, s.train):
                assert set(c.labels()[part]) == {0, 1}               # each part holds both classes
            val_pat = {c.bags[i].patient_id for i in s.val}
            assert abs(len(val_pat) - round(0.15 * n_pat)) <= 1
            test_pat = {c.bags[i].patient_id for i in s.test}
            pos = np.mean([c.bags[next(i for i in s.test if c.bags[i].patient_id == p)].label for p in test_pat])
            assert abs(pos - 0.4) < 0.2
        if folds > 1:
            assert set(tested) == set(range(len(c.bags))) and set(tested.values()) == {1}
        else:
            assert abs(len({c.bags[i].patient_id for i in splits[0].test}) - 0.2 * n_pat) <= 1
    c = toy_cohort(seed=3)
    a, b = make_splits(c, 5, seed=1), make_splits(c, 5, seed=1)
    assert [(s.train, s.val, s.test) for s in a] == [(s.train, s.val, s.test) for s in b]
    assert [s.test for s in make_splits(c, 5, seed=2)] != [s.test for s in a]
    assert make_splits(c, 3, val_fraction=0.0)[0].val == []


def test_small_cohort_still_gets_val():
    c = toy_cohort(n_patients=6, pos_frac=0.5, seed=2)
    for s in make_splits(c, 3):
        assert {c.bags[i].label for i in s.val} == {0, 1} and set(c.labels()[s.train]) == {0, 1}


def test_too_few_patients():
    c = toy_cohort(n_patients=20, pos_frac=0.15)         # 3 tumor patients
    with pytest.raises(LabelsError, match="class 'tumor' has 3 patients, fewer than --folds 5; use --folds 3"):
        make_splits(c, 5)
    assert len(make_splits(c, 3)) == 3
    c1 = toy_cohort(n_patients=20, pos_frac=0.05)        # 1 tumor patient
    with pytest.raises(LabelsError, match="class 'tumor' has 1 patient; a train/test split needs"):
        make_splits(c1, 1)


def test_csv_split_column():
    c = toy_cohort(n_patients=20, seed=1)
    part_of = {f"p{p}": ("test" if p % 5 == 0 else "val" if p % 5 == 1 else "train") for p in range(20)}
    c.csv_split = [part_of[b.patient_id] for b in c.bags]
    (s,) = make_splits(c, 5)
    for part in ("train", "val", "test"):
        assert getattr(s, part) == [i for i, b in enumerate(c.bags) if part_of[b.patient_id] == part]
    assert len(make_splits(c, 5, use_csv_split=False)) == 5
    # no val rows: val carved from train by patient, stratified
    c.csv_split = ["test" if part_of[b.patient_id] == "test" else "train" for b in c.bags]
    (s,) = make_splits(c, 5, val_fraction=0.2)
    assert s.test == [i for i, b in enumerate(c.bags) if part_of[b.patient_id] == "test"]
    assert len({c.bags[i].patient_id for i in s.val}) == 4 and set(c.labels()[s.val]) == {0, 1}
    assert all(len(v) == 1 for v in _parts_by_patient(c, s).values())
    c.labels_csv = "labels.csv"
    pid = Counter(c.patients().tolist()).most_common(1)[0][0]      # a patient with two slides
    first, second = [i for i, b in enumerate(c.bags) if b.patient_id == pid][:2]
    bad = list(c.csv_split)
    bad[first], bad[second] = "test", "train"
    c.csv_split = bad
    with pytest.raises(LabelsError, match=f"labels.csv: patient '{pid}' has slides in test .* and train"):
        make_splits(c)
    c.csv_split = ["train"] * len(c.bags)
    with pytest.raises(LabelsError, match="no slide with features in test"):
        make_splits(c)


def test_write_splits(tmp_path):
    c = toy_cohort(n_patients=12, seed=4)
    splits = make_splits(c, 3, seed=0)
    d = write_splits(c, splits, tmp_path / "run")
    assert d == tmp_path / "run" / "splits"
    assert sorted(p.name for p in d.iterdir()) == ["README.txt", "fold_0.csv", "fold_1.csv", "fold_2.csv"]
    for s in splits:
        with (d / f"fold_{s.fold}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["slide_id", "patient_id", "label", "part", "patient_labels", "stratum"]
        got = {r["slide_id"]: (r["patient_id"], r["label"], r["part"], r["patient_labels"], r["stratum"])
               for r in rows}
        assert len(got) == len(rows) == len(c.bags)
        for part in ("train", "val", "test"):
            for i in getattr(s, part):
                b = c.bags[i]
                name = c.class_names[b.label]      # one label per patient here: stratum = the label
                assert got[b.slide_id] == (b.patient_id, name, part, name, name)
    note = (d / "README.txt").read_text()
    assert "Splits by patient (stratified folds)" in note and "0 patients have slides of different labels" in note
    assert note.count("fold ") == 3 and "normal: " in note and "tumor: " in note
