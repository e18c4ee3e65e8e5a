"""`wsi synth` from the command line: slides openslide reads, labels, annotations on tissue."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import openslide
import pytest

from wsi.slide import open_slide
from wsi.tissue import segment_tissue


def test_wsi_synth_cohort(tmp_path):
    out = tmp_path / "cohort"
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "-q", "synth", str(out), "--slides", "3", "--seed", "7",
                        "--width", "6144", "--height", "4608", "--slide-mpp", "0.25"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((out / "labels.csv").open()))
    assert [row["slide_id"] for row in rows] == ["synth_000", "synth_001", "synth_002"]
    labels = {row["slide_id"]: row["label"] for row in rows}
    assert set(labels.values()) == {"tumor", "normal"}
    for sid, label in labels.items():
        osr = openslide.OpenSlide(str(out / f"{sid}.svs"))
        assert osr.properties["openslide.vendor"] == "aperio"
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert osr.dimensions == (6144, 4608) and osr.level_downsamples[1] == pytest.approx(4)
        ann = out / "annotations" / f"{sid}.geojson"
        assert ann.exists() == (label == "tumor")
        if label != "tumor":
            continue
        feats = json.loads(ann.read_text())["features"]
        assert feats and all(f["properties"]["classification"]["name"] == "Tumor" for f in feats)
        with open_slide(out / f"{sid}.svs") as s:
            t = segment_tissue(s)
        # Rasterise the tumor polygons onto the tissue mask's grid: they lie on segmented tissue.
        tumor = np.zeros_like(t.mask)
        for f in feats:
            ring = np.asarray(f["geometry"]["coordinates"][0], float)
            assert (ring[:, 0] >= 0).all() and (ring[:, 0] <= 6144).all() and (ring[:, 1] <= 4608).all()
            pts = np.round(ring / np.array(t.downsample)).astype(np.int32)
            cv2.fillPoly(tumor, [pts.reshape(-1, 1, 2)], 1)
        assert tumor.sum() > 20
        assert t.mask[tumor.astype(bool)].mean() > 0.97


def test_wsi_synth_hard_preset_and_options(tmp_path):
    out = tmp_path / "hard"
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "-q", "synth", str(out), "--slides", "4", "--seed", "3",
                        "--width", "3072", "--height", "2304", "--slide-mpp", "0.5", "--preset", "hard",
                        "--mimics", "1,1", "--jpeg-quality", "70", "--inflammation-elsewhere", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "synth.json").read_text())
    assert record["preset"] == "hard"
    opts = record["options"]
    assert opts["mimics"] == [1, 1] and opts["jpeg_quality"] == [70, 70]  # given
    assert opts["stain_jitter"] == 0.25 and opts["tumor_fraction"] == [0.005, 0.05]  # from the preset
    for sid, info in record["slides"].items():
        assert info["quality"] == 70 and len(info["mimics"]) == 1
        extra = json.loads((out / "annotations" / "extra" / f"{sid}.geojson").read_text())["features"]
        names = {f["properties"]["classification"]["name"] for f in extra}
        # Normal slides: the patch drawn with probability 1; tumour slides: margin rims (hard: p = 0.8) or it.
        assert names == {"Mimic", "Inflammation"} if info["label"] == "normal" else "Mimic" in names
        assert info["label"] == "tumor" or info["inflammation_elsewhere"] >= 1
        ann = out / "annotations" / f"{sid}.geojson"
        if ann.exists():
            assert {f["properties"]["classification"]["name"] for f in json.loads(ann.read_text())["features"]} \
                == {"Tumor"}


def test_wsi_synth_help_and_bad_options(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "synth", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--preset {easy,hard}" in text and "(easy: 0,0; hard: 0,3)" in text and "annotations/extra/" in text
    for bad in (["--blur", "-1"], ["--tumor-fraction", "0.2,0.1"], ["--inflammation", "2"]):
        r = subprocess.run([sys.executable, "-m", "wsi.cli", "-q", "synth", str(tmp_path / "x"), *bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-m", "wsi.cli", "-q", "synth", str(tmp_path / "x"), "--clusters", "a"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--clusters" in r.stderr
