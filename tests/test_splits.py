"""wsi.splits: one splitter for every package, by patient where a labels CSV says; the label -> class
mapping of wsi.tile_classes shared by zero-shot, the probe, the captions and the reasoner's MCQs."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from clip.captions import captions_from_labels
from clip.data import CaptionsError, read_captions, split_by_group
from clip.probe import split_slides
from conftest import make_store
from wsi.errors import LabelsError
from wsi.splits import read_patients, split_groups
from wsi.tile_classes import class_indices, tiles_by_class

# 6 patients, two slides each: p0 holds s0a and s0b, ...
SLIDES = [f"s{p}{x}" for p in range(6) for x in "ab"]
PATIENTS = {s: f"p{s[1]}" for s in SLIDES}


def test_split_groups_keeps_a_patient_on_one_side_and_is_deterministic():
    items = [s for s in SLIDES for _ in range(3)]            # three tiles per slide
    for seed in range(8):
        tr, te = split_groups(items, 0.3, seed, patients=PATIENTS)
        assert sorted(tr + te) == list(range(len(items))) and tr and te
        assert not {PATIENTS[items[i]] for i in tr} & {PATIENTS[items[i]] for i in te}
        assert len({PATIENTS[items[i]] for i in te}) == 2    # round(0.3 * 6 patients)
        assert (tr, te) == split_groups(list(reversed(items))[::-1], 0.3, seed, patients=PATIENTS)
    assert split_groups(items, 0.3, 0, patients=PATIENTS) != split_groups(items, 0.3, 1, patients=PATIENTS)
    tr, te = split_groups(["x", "y"], 0.9, 0)                 # at least one on each side
    assert len(tr) == len(te) == 1
    with pytest.raises(LabelsError, match="one patient"):
        split_groups(["s0a", "s0b"], 0.5, 0, patients=PATIENTS)


def test_read_patients(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("slide_id,label,patient_id\ns0a,tumor,p0\ns0b,normal,p0\ns1a,tumor,\n")
    assert read_patients(p) == {"s0a": "p0", "s0b": "p0", "s1a": "s1a"}
    (tmp_path / "bad.csv").write_text("name,label\nx,y\n")
    with pytest.raises(LabelsError, match="bad.csv: no slide_id column"):
        read_patients(tmp_path / "bad.csv")


def test_clip_validation_split_by_patient_column(tmp_path):
    """A captions CSV with a patient_id column: `clip train`'s validation never shares a patient with
    training (by slide alone, two slides of one patient land on both sides for most seeds)."""
    st = make_store(tmp_path / "s.zarr", {s: 4 for s in SLIDES}, tiles=True,
                    labels={"y": {s: (np.arange(4) % 2).astype(np.float32) for s in SLIDES}})
    out = tmp_path / "caps.csv"
    captions_from_labels(st, "y", out, patients=PATIENTS)
    caps = read_captions(out, store=st)
    assert caps.patients == PATIENTS
    for seed in range(8):
        tr, va = split_by_group(caps, 0.3, seed)
        assert va and not {PATIENTS[caps.group_of(i)] for i in tr} & {PATIENTS[caps.group_of(i)] for i in va}
    with pytest.raises(CaptionsError, match="one slide.*--val-fraction 0"):
        split_by_group(read_captions(_one_slide_csv(tmp_path, st), store=st), 0.2, 0)


def _one_slide_csv(tmp_path, st):
    p = tmp_path / "one.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([("slide_id", "tile", "caption"), ("s0a", 0, "x"), ("s0a", 1, "y")])
    return p


def test_probe_split_by_patient():
    for seed in range(8):
        train, test = split_slides(SLIDES, 0.3, seed, patients=PATIENTS)
        assert train and test and not {PATIENTS[s] for s in train} & {PATIENTS[s] for s in test}
    assert split_slides(["s3", "s1", "s2"], 0.3, seed=0) == split_slides(["s1", "s2", "s3"], 0.3, seed=0)


def test_one_label_mapping_for_captions_and_zeroshot(tmp_path):
    """Integer labels beyond the classes are refused everywhere (the captions once read a 2 as the
    positive class of two while zero-shot refused it); fractions are positive above 0.5."""
    assert class_indices(np.array([0.2, 0.5, 0.51, np.nan]), 2, "x").tolist() == [0, 0, 1, -1]
    st = make_store(tmp_path / "s.zarr", {"a": 3}, tiles=True, labels={"k": {"a": np.array([0, 1, 2], np.float32)}})
    with pytest.raises(LabelsError, match="class indices 0..2 do not fit the 2 classes"):
        tiles_by_class(st, "k", 2)
    with pytest.raises(CaptionsError, match="class indices 0..2 do not fit the 2 classes"):
        captions_from_labels(st, "k", tmp_path / "c.csv")
    tiles, _, _ = tiles_by_class(st, "k", 3)
    assert tiles == [[("a", 0)], [("a", 1)], [("a", 2)]]


def test_split_by_label_stratifies_and_keeps_patients_whole(tmp_path):
    from wsi.splits import read_slide_labels, split_by_label

    p = tmp_path / "labels.csv"
    with open(p, "w", newline="") as f:   # 8 patients with a tumour and a normal slide, 8 with one normal slide
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "patient_id"])
        w.writerows([(f"t{i}", "tumor", f"p{i}") for i in range(8)] + [(f"n{i}", "normal", f"p{i}") for i in range(16)])
    labels, patients = read_slide_labels(p), read_patients(p)
    for seed in range(8):
        train, test = split_by_label(labels, 0.25, seed, patients=patients)
        assert sorted(train + test) == sorted(labels) and train == sorted(train)
        assert not {patients[s] for s in train} & {patients[s] for s in test}
        held = {patients[s] for s in test}
        assert sum(f"t{int(q[1:])}" in labels and int(q[1:]) < 8 for q in held) == 2   # 2 of the 8 mixed patients
        assert len(held) == 4                                                          # and 2 of the 8 others
    one = {f"s{i}": "ab"[i % 2] for i in range(10)}                                    # one slide per patient
    train, test = split_by_label(one, 0.4, 3)
    assert sorted(one[s] for s in test) == ["a", "a", "b", "b"]


def test_cli_patients_option_for_captions_and_probe(tmp_path):
    import json

    from clip.cli import main

    st = make_store(tmp_path / "s.zarr", {s: 4 for s in SLIDES}, tiles=True, tile_size=32,
                    labels={"y": {s: (np.arange(4) % 2).astype(np.float32) for s in SLIDES}})
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(f"{s},x,{p}\n" for s, p in PATIENTS.items()))
    out = tmp_path / "caps.csv"
    assert main(["-q", "captions", str(st.path), "--labels", "y", "--out", str(out), "--patients", str(labels)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert rows and all(r["patient_id"] == PATIENTS[r["slide_id"]] for r in rows)
    res = tmp_path / "probe.json"
    assert main(["-q", "probe", "--model", "pathoclip-tiny", "--store", str(st.path), "--labels", "y", "--shots", "2",
                 "--patients", str(labels), "--device", "cpu", "--out", str(res)]) == 0
    data = json.loads(res.read_text())["data"]
    assert not {PATIENTS[s] for s in data["train_slides"]} & {PATIENTS[s] for s in data["test_slides"]}
    assert json.loads(res.read_text())["config"]["by_patient"] is True
