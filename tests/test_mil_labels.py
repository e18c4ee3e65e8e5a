"""mil.labels: the labels CSV (validation, one-line errors naming the file) and the class mapping."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mil.labels import class_mapping, labels_digest, read_labels_csv
from wsi.errors import LabelsError, PathmilError


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("header,rows,match", [
    (["slide_id", "diagnosis"], [["a", "x"]], "no 'label' column"),
    (["id", "label"], [["a", "x"]], "no 'slide_id' column"),
    (["slide_id", "label"], [["a", "x"], ["b", "y"], ["a", "y"]], "'a' appears twice"),
    (["slide_id", "label", "split"], [["a", "x", "train"], ["b", "y", "holdout"]], "line 3.*'holdout'"),
    (["slide_id", "label"], [], "no rows"),
    (["slide_id", "label"], [["a", ""]], "line 2.*no label"),
    (["slide_id", "label", "label"], [["a", "x", "y"]], "'label' appears more than once"),
])
def test_csv_errors_one_line_naming_file(tmp_path, header, rows, match):
    p = write_csv(tmp_path / "labels.csv", header, rows)
    with pytest.raises(LabelsError, match=match) as e:
        read_labels_csv(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_csv_empty_missing_and_not_text(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(LabelsError, match="empty file") as e:
        read_labels_csv(p)
    assert str(p) in str(e.value)
    with pytest.raises(PathmilError, match=r"nope.csv: no such labels CSV"):   # one line and exit 2 in the CLI
        read_labels_csv(tmp_path / "nope.csv")
    q = tmp_path / "semi.csv"
    q.write_text("slide_id;label\na;x\n")
    with pytest.raises(LabelsError, match="comma-separated"):
        read_labels_csv(q)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("slide_id,label\na,tumeur maligne \xe9\n".encode("latin-1"))
    with pytest.raises(LabelsError, match="latin.csv: not UTF-8"):
        read_labels_csv(latin)


def test_csv_reads_defaults_and_splits(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("\ufeffSlide_ID, Label ,split\n a ,tumor, TRAIN\nb,normal,Validation\n\nc,normal,test\n")
    rows = read_labels_csv(p)
    assert [(r.slide_id, r.patient_id, r.label, r.split, r.line) for r in rows] == [
        ("a", "a", "tumor", "train", 2), ("b", "b", "normal", "val", 3), ("c", "c", "normal", "test", 5)]


def test_labels_digest_follows_the_content(tmp_path):
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["a", "x"], ["b", "y"]])
    d = labels_digest(p)
    assert len(d) == 64 and labels_digest(p) == d
    write_csv(p, ["slide_id", "label"], [["a", "x"], ["b", "x"]])
    assert labels_digest(p) != d


def test_class_mapping():
    assert class_mapping(["tumor", "normal", "tumor"]) == (["normal", "tumor"], "tumor")
    assert class_mapping(["Malignant", "Benign"]) == (["Benign", "Malignant"], "Malignant")
    assert class_mapping(["yes", "NO"]) == (["NO", "yes"], "yes")
    assert class_mapping(["1", "0"]) == (["0", "1"], "1")
    assert class_mapping(["Non_Tumor", "adenoma"]) == (["Non_Tumor", "adenoma"], "adenoma")
    assert class_mapping(["b", "a"]) == (["a", "b"], "b")          # nothing reads negative: sorted
    assert class_mapping(["tumor", "normal"], positive="normal") == (["tumor", "normal"], "normal")
    assert class_mapping(["a", "b"], classes=["b", "a"]) == (["b", "a"], "a")
    assert class_mapping(["a", "b"], classes=["b", "a"], positive="a") == (["b", "a"], "a")
    assert class_mapping(["10", "2", "1"]) == (["1", "2", "10"], None)
    assert class_mapping(["x", "y", "z"], classes=["z", "y", "x", "w"]) == (["z", "y", "x", "w"], None)
    with pytest.raises(LabelsError, match=r"labels \['c'\] are not among the classes"):
        class_mapping(["a", "b", "c"], classes=["a", "b"])
    with pytest.raises(LabelsError, match="'tumour' is not a class"):
        class_mapping(["tumor", "normal"], positive="tumour")
    with pytest.raises(LabelsError, match="applies to two classes"):
        class_mapping(["a", "b", "c"], positive="a")
    with pytest.raises(LabelsError, match="empty or repeated"):
        class_mapping(["a"], classes=["a", "a"])
