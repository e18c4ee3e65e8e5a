"""Patients with slides of different labels (TCGA: a tumour and a normal slide of one patient): read,
split by patient and stratified by each patient's set of labels, recorded in the split files, trained."""
from __future__ import annotations

import csv
import json
import warnings
from collections import Counter

import numpy as np
import pytest

from mil.cohort import Bag, Cohort
from mil.labels import read_labels_csv
from mil.splits import make_splits, write_splits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["normal", "tumor"]


def mixed_cohort(n_normal: int = 12, n_tumor: int = 12, n_mixed: int = 10, seed: int = 0) -> Cohort:
    """Patients with only normal slides, only tumour slides, and both (one normal and one or two tumour
    slides), in shuffled order."""
    rng = np.random.default_rng(seed)
    kinds = ["normal"] * n_normal + ["tumor"] * n_tumor + ["mixed"] * n_mixed
    bags = []
    for p, kind in enumerate(rng.permutation(kinds)):
        labels = {"normal": [0] * int(rng.integers(1, 3)), "tumor": [1] * int(rng.integers(1, 3)),
                  "mixed": [0] + [1] * int(rng.integers(1, 3))}[kind]
        for s, y in enumerate(labels):
            bags.append(Bag(f"P{p:02d}_{s}", f"P{p:02d}", y, np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64)))
    return Cohort(bags, NAMES, "tumor", "enc", "mem")


def patient_sets(c: Cohort) -> dict[str, frozenset[int]]:
    out: dict[str, set[int]] = {}
    for b in c.bags:
        out.setdefault(b.patient_id, set()).add(b.label)
    return {p: frozenset(v) for p, v in out.items()}


def test_labels_csv_accepts_a_patient_with_a_tumour_and_a_normal_slide(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("slide_id,label,patient_id\nTCGA-01-tumour,tumor,TCGA-01\nTCGA-01-normal,normal,TCGA-01\n"
                 "TCGA-02-tumour,tumor,TCGA-02\n")
    rows = read_labels_csv(p)
    assert [(r.slide_id, r.patient_id, r.label) for r in rows] == [
        ("TCGA-01-tumour", "TCGA-01", "tumor"), ("TCGA-01-normal", "TCGA-01", "normal"),
        ("TCGA-02-tumour", "TCGA-02", "tumor")]


@pytest.mark.parametrize("folds", [1, 3, 5])
def test_no_patient_crosses_parts_and_strata_are_balanced(folds):
    for seed in range(8):
        c = mixed_cohort(seed=seed)
        sets = patient_sets(c)
        strata = Counter(sets.values())
        assert strata[frozenset({0, 1})] == 10
        splits = make_splits(c, folds, seed=seed)
        tested: Counter = Counter()
        per_fold_test: list[Counter] = []
        for s in splits:
            assert sorted(s.train + s.val + s.test) == list(range(len(c.bags)))
            owner: dict[str, set[str]] = {}
            for part in ("train", "val", "test"):
                for i in getattr(s, part):
                    owner.setdefault(c.bags[i].patient_id, set()).add(part)
            assert all(len(v) == 1 for v in owner.values())          # every slide of a patient in one part
            for part in (s.train, s.val, s.test):
                assert set(c.labels()[part]) == {0, 1}                # both classes, per slide, in every part
                assert {sets[c.bags[i].patient_id] for i in part} == set(strata)   # every stratum too
            tested.update(s.test)
            per_fold_test.append(Counter(sets[p] for p in {c.bags[i].patient_id for i in s.test}))
        if folds > 1:   # each slide tested once; each stratum spread over the folds within one patient
            assert set(tested.values()) == {1} and len(tested) == len(c.bags)
            for key, n in strata.items():
                got = [f[key] for f in per_fold_test]
                assert sum(got) == n and max(got) - min(got) <= 1, (key, got)
        else:           # one split: test is 20% of each stratum (largest remainder)
            for key, n in strata.items():
                assert abs(per_fold_test[0][key] - 0.2 * n) <= 1, (key, per_fold_test[0])


def test_a_rare_stratum_joins_the_largest_set_sharing_a_label(tmp_path):
    c = mixed_cohort(n_normal=10, n_tumor=14, n_mixed=2, seed=1)      # 2 mixed patients, 5 folds
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no "least populated class" warning from sklearn
        splits = make_splits(c, 5, seed=0)
    mixed = sorted(p for p, v in patient_sets(c).items() if len(v) == 2)
    assert all(s.strata[p] == (1,) for s in splits for p in mixed)     # tumor: the larger set sharing a label
    d = write_splits(c, splits, tmp_path)
    with (d / "fold_0.csv").open() as f:
        rows = list(csv.DictReader(f))
    got = {(r["patient_id"], r["patient_labels"], r["stratum"]) for r in rows if r["patient_id"] in mixed}
    assert got == {(p, "normal+tumor", "tumor") for p in mixed}
    note = (d / "README.txt").read_text()
    assert f"2 patients have slides of different labels ({', '.join(mixed)})" in note
    # tumour patients (14 + 2 mixed) spread over 5 folds: 3 or 4 each
    per = [Counter(c.bags[i].patient_id for i in s.test) for s in splits]
    n_tum = [sum(1 for p in f if 1 in patient_sets(c)[p]) for f in per]
    assert sorted(n_tum) == [3, 3, 3, 3, 4]


def test_one_label_per_patient_keeps_plain_label_stratification():
    from sklearn.model_selection import StratifiedKFold

    c = mixed_cohort(n_mixed=0, seed=2)
    pats = list(dict.fromkeys(b.patient_id for b in c.bags))
    y = [next(b.label for b in c.bags if b.patient_id == p) for p in pats]
    want = [sorted(pats[j] for j in test) for _, test in
            StratifiedKFold(5, shuffle=True, random_state=3).split(np.zeros(len(pats)), y)]
    got = [sorted({c.bags[i].patient_id for i in s.test}) for s in make_splits(c, 5, seed=3)]
    assert got == want


def test_mil_train_on_a_cohort_with_mixed_patients(tmp_path, capsys):
    """`mil train` on a store whose patients have a tumour and a normal slide: folds by patient, the split
    files say so, and predictions and bag metrics stay per slide."""
    from conftest import make_store
    from mil.cli import main

    rng = np.random.default_rng(0)
    slides: dict[str, tuple[str, str]] = {}          # slide -> (patient, label)
    for p in range(6):
        slides[f"m{p}_T"], slides[f"m{p}_N"] = (f"M{p}", "tumor"), (f"M{p}", "normal")
    for p in range(5):
        slides[f"n{p}"], slides[f"t{p}"] = (f"N{p}", "normal"), (f"T{p}", "tumor")
    feats = {}
    for sid, (_, label) in slides.items():
        x = rng.standard_normal((int(rng.integers(12, 30)), 8)).astype(np.float32)
        if label == "tumor":
            x[: len(x) // 3, :2] += 3.0
        feats[sid] = x
    make_store(tmp_path / "s.zarr", {s: len(x) for s, x in feats.items()}, features={"toy": feats})
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(f"{s},{y},{p}\n" for s, (p, y) in slides.items()))
    run = tmp_path / "run"
    assert main(["train", "--store", str(tmp_path / "s.zarr"), "--labels", str(labels), "--encoder", "toy",
                 "--model", "abmil", "--model-kwargs", '{"hidden": 16, "attn_hidden": 8}', "--folds", "3",
                 "--epochs", "3", "--min-epochs", "1", "--batch-size", "4", "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    for k in range(3):
        with (run / "splits" / f"fold_{k}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["slide_id"] for r in rows) == sorted(slides)
        parts: dict[str, set[str]] = {}
        for r in rows:
            assert (r["patient_id"], r["label"]) == slides[r["slide_id"]]
            parts.setdefault(r["patient_id"], set()).add(r["part"])
            assert r["patient_labels"] == ("normal+tumor" if r["patient_id"].startswith("M") else r["label"])
        assert all(len(v) == 1 for v in parts.values()), parts
        assert {r["stratum"] for r in rows} == {"normal", "tumor", "normal+tumor"}   # 6 mixed patients >= 3 folds
    note = (run / "splits" / "README.txt").read_text()
    assert "6 patients have slides of different labels (M0, M1, M2, M3, M4, M5)" in note
    with (run / "predictions.csv").open() as f:
        preds = list(csv.DictReader(f))
    assert sorted(r["slide_id"] for r in preds) == sorted(slides)      # every slide scored once, with its own label
    assert all((r["patient_id"], r["label"]) == slides[r["slide_id"]] for r in preds)
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["bag_auc"]["folds"]) == 3 and all(0 <= v <= 1 for v in m["bag_auc"]["folds"])
