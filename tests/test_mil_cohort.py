"""mil.cohort: bags from a tile store and from CLAM / TRIDENT h5 folders (one feature-source interface),
and the cohort fingerprint a run records."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from conftest import make_store  # noqa: E402
from mil.cohort import Bag, Cohort, H5Features, StoreFeatures, feature_source, load_cohort  # noqa: E402
from mil.splits import make_splits  # noqa: E402
from test_mil_labels import write_csv  # noqa: E402
from wsi.errors import CohortError, LabelsError, StoreError  # noqa: E402
from wsi.h5 import h5_feature_files, read_h5_bag  # noqa: E402
from wsi.store import TileStore  # noqa: E402

ENC = "hf-hub:test/Enc"
DIM = 8


def feats_of(sid: str, n: int, dim: int = DIM, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, sid)))
    return rng.standard_normal((n, dim)).astype(dtype)


def coords_of(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256, np.arange(n) % 3 * 256], 1)


def cohort_store(path: Path, slides: dict[str, int], *, labels: dict[str, np.ndarray] | None = None,
                 dtype=np.float32, incomplete: tuple[str, ...] = ()) -> TileStore:
    """Slides with `feats_of` features of ENC (those in `incomplete`: started, never finished) and
    optional `tumor` tile labels, built through the store API."""
    store = make_store(path, {sid: {"coords": coords_of(n)} for sid, n in slides.items()},
                       features={ENC: {s: feats_of(s, n, dtype=dtype) for s, n in slides.items()
                                       if s not in incomplete}},
                       labels={"tumor": labels or {}}, size0=256)
    for sid in incomplete:
        store[sid].create_features(ENC, DIM, {})[: slides[sid] // 2] = feats_of(sid, slides[sid] // 2)  # no finish()
    return store


# ---- from a store ----------------------------------------------------------------------------------
def test_load_from_store(tmp_path, caplog):
    cohort_store(tmp_path / "s.zarr", {"s1": 5, "s2": 7, "s3": 4, "s4": 6, "extra1": 3, "extra2": 3},
                 labels={"s1": np.linspace(0, 1, 5), "s3": np.ones(4)}, incomplete=("s4",))
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "patient_id"],
                  [["s1", "tumor", "P1"], ["s2", "normal", ""], ["s3", "tumor", "P3"], ["s4", "normal", "P4"],
                   ["gone", "normal", "P5"]])
    with caplog.at_level(logging.WARNING, logger="mil.cohort"):
        c = load_cohort(p, store=tmp_path / "s.zarr", encoder=ENC, instance_labels="tumor", progress=False)
    assert [b.slide_id for b in c.bags] == ["s1", "s2", "s3"]
    assert [b.patient_id for b in c.bags] == ["P1", "s2", "P3"]
    assert c.class_names == ["normal", "tumor"] and c.positive_class == "tumor"
    assert c.labels().tolist() == [1, 0, 1] and c.patients().tolist() == ["P1", "s2", "P3"]
    assert c.dim == DIM and c.encoder == ENC and c.source == str(tmp_path / "s.zarr") and c.csv_split is None
    assert c.source_kind == "store" and c.labels_csv == str(p) and len(c.labels_sha256) == 64
    for b in c.bags:
        n = len(b.features)
        assert b.features.dtype == np.float32
        np.testing.assert_array_equal(b.features, feats_of(b.slide_id, n))
        np.testing.assert_array_equal(b.coords, coords_of(n))
        assert b.coords.dtype == np.int64
    np.testing.assert_allclose(c.bags[0].instance_labels, np.linspace(0, 1, 5))
    assert c.bags[0].instance_labels.dtype == np.float32 and c.bags[1].instance_labels is None
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 3, warns
    missing = next(w for w in warns if "no 'hf-hub:test/Enc' features" in w)
    assert missing.startswith("2 of 5 slides") and "s4, gone" in missing
    unlab = next(w for w in warns if "have no row in" in w)
    assert unlab.startswith("2 slides") and "extra1, extra2" in unlab
    inst = next(w for w in warns if "instance labels" in w)
    assert inst.startswith("1 of 3 slides") and "s2" in inst


def test_store_float16_kept_single_class_and_errors(tmp_path):
    cohort_store(tmp_path / "s.zarr", {"a": 3, "b": 4, "c": 2}, dtype=np.float16)
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["a", "x"], ["b", "y"], ["c", "y"]])
    c = load_cohort(p, store=TileStore.open(tmp_path / "s.zarr", readonly=True), encoder=ENC, progress=False)
    assert c.bags[0].features.dtype == np.float16 and c.class_names == ["x", "y"]
    q = write_csv(tmp_path / "one.csv", ["slide_id", "label"], [["b", "y"], ["c", "y"], ["nofeat", "x"]])
    with pytest.raises(CohortError, match="every slide with features has label 'y'") as e:
        load_cohort(q, store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    assert str(q) in str(e.value)
    with pytest.raises(CohortError, match="none of its 1 slides"):
        load_cohort(write_csv(tmp_path / "n.csv", ["slide_id", "label"], [["zz", "x"]]),
                    store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    with pytest.raises(CohortError, match="exactly one of store"):
        load_cohort(p, encoder=ENC)
    with pytest.raises(StoreError, match="absent.zarr: no tile store here"):
        load_cohort(p, store=tmp_path / "absent.zarr", encoder=ENC)
    assert not (tmp_path / "absent.zarr").exists()                       # read-only: nothing created
    with pytest.raises(LabelsError, match="nope.csv"):
        load_cohort(tmp_path / "nope.csv", store=tmp_path / "s.zarr", encoder=ENC)


def test_instance_labels_belong_to_the_tiles_they_were_written_for(tmp_path):
    store = cohort_store(tmp_path / "s.zarr", {"a": 3, "b": 4})
    store["a"].write_labels("tumor", np.ones(3), {})
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["a", "x"], ["b", "y"]])
    assert load_cohort(p, store=store, encoder=ENC, instance_labels="tumor", progress=False).bags[0] \
        .instance_labels.tolist() == [1, 1, 1]
    store.add_slide("a", coords_of(5))                                  # re-tiled: 5 tiles, labels gone
    store["a"].write_features(ENC, feats_of("a", 5), {})
    assert load_cohort(p, store=store, encoder=ENC, instance_labels="tumor", progress=False).bags[0] \
        .instance_labels is None


def test_damaged_slide_is_left_out_with_a_warning(tmp_path, caplog):
    cohort_store(tmp_path / "s.zarr", {"a": 3, "b": 4, "c": 5})
    (tmp_path / "s.zarr" / "slides" / "c" / "zarr.json").write_text("{broken")
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["a", "x"], ["b", "y"], ["c", "y"]])
    with caplog.at_level(logging.WARNING):
        c = load_cohort(p, store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    assert c.slide_ids() == ["a", "b"] and "'c'" in caplog.text


# ---- from CLAM / TRIDENT h5 ------------------------------------------------------------------------
SLIDES = {"c1": 12, "c2": 9, "c3": 15}
LABELS = [["c1", "tumor", "A"], ["c2", "normal", "B"], ["c3", "tumor", "A"]]


def _h5(path: Path, feats: np.ndarray, coords: np.ndarray, chunk: int) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats, chunks=(chunk, feats.shape[1]), maxshape=(None, feats.shape[1]))
        f.create_dataset("coords", data=coords, chunks=(chunk, 2), maxshape=(None, 2))


def make_h5_folders(tmp_path: Path) -> tuple[Path, Path]:
    clam = tmp_path / "clam"
    (clam / "h5_files").mkdir(parents=True)
    job = tmp_path / "trident"
    fd = job / "20x_256px_0px_overlap" / "features_uni_v1"
    fd.mkdir(parents=True)
    (job / "20x_256px_0px_overlap" / "slide_features_titan").mkdir()
    for sid, n in SLIDES.items():
        f, c = feats_of(sid, n), coords_of(n)
        _h5(clam / "h5_files" / f"{sid}.h5", f, c.astype(np.int32), 4)          # CLAM: int32 coords
        _h5(fd / f"{sid}.h5", f, c.astype(np.int64), 1)                         # TRIDENT: 1-row chunks
    _h5(job / "20x_256px_0px_overlap" / "slide_features_titan" / "c1.h5", np.zeros((1, 4), np.float32),
        np.zeros((1, 2), np.int64), 1)
    return clam, job


def test_h5_readers(tmp_path):
    clam, job = make_h5_folders(tmp_path)
    assert sorted(h5_feature_files(clam, "x")) == sorted(SLIDES)
    files = h5_feature_files(job, "uni_v1")
    assert sorted(files) == sorted(SLIDES) and files["c1"].parent.name == "features_uni_v1"
    f, c = read_h5_bag(files["c2"])
    assert f.dtype == np.float32 and c.dtype == np.int64 and f.shape == (9, DIM)
    np.testing.assert_array_equal(c, coords_of(9))
    Path(f"{files['c3']}.lock").touch()
    assert sorted(h5_feature_files(job, "uni_v1")) == ["c1", "c2"]
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="bad.h5: cannot open"):
        read_h5_bag(bad)


def test_load_from_h5_clam_and_trident_same_bags(tmp_path):
    clam, job = make_h5_folders(tmp_path)
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "patient_id"], LABELS)
    a = load_cohort(p, h5_dir=clam, encoder="uni_v1", progress=False)
    b = load_cohort(p, h5_dir=job, encoder="uni_v1", progress=False)
    assert a.source == str(clam) and b.source == str(job) and a.source_kind == b.source_kind == "h5"
    assert a.class_names == b.class_names == ["normal", "tumor"]
    for x, y in zip(a.bags, b.bags):
        assert (x.slide_id, x.patient_id, x.label) == (y.slide_id, y.patient_id, y.label)
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.features, feats_of(x.slide_id, SLIDES[x.slide_id]))
        assert x.instance_labels is None and x.coords.dtype == np.int64
    with pytest.raises(CohortError, match="live in a tile store"):
        load_cohort(p, h5_dir=clam, encoder="uni_v1", instance_labels="tumor", progress=False)


def test_one_interface_store_and_h5_give_the_same_bags(tmp_path):
    """A store imported from h5 and the h5 folder itself: the same bags through either source."""
    clam, _ = make_h5_folders(tmp_path)
    cohort_store(tmp_path / "s.zarr", SLIDES)
    h5, st = feature_source(h5_dir=clam, encoder=ENC), feature_source(store=tmp_path / "s.zarr", encoder=ENC)
    assert isinstance(h5, H5Features) and isinstance(st, StoreFeatures)
    assert h5.slide_ids() == st.slide_ids() == sorted(SLIDES)
    for sid in SLIDES:
        (fa, ca), (fb, cb) = h5.read(sid), st.read(sid)
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(ca, cb)
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "patient_id"], LABELS)
    a = load_cohort(p, source=h5, encoder=ENC, progress=False)
    b = load_cohort(p, source=st, encoder=ENC, progress=False)
    assert a.fingerprint()["features"]["sha256"] == b.fingerprint()["features"]["sha256"]
    assert a.fingerprint()["features"]["kind"] == "h5" and b.fingerprint()["features"]["kind"] == "store"


# ---- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_changes_with_labels_features_and_source(tmp_path):
    store = cohort_store(tmp_path / "s.zarr", {f"s{i}": 3 + i for i in range(4)})
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [[f"s{i}", "ab"[i % 2]] for i in range(4)])

    def load(path=tmp_path / "s.zarr"):
        return load_cohort(p, store=path, encoder=ENC, progress=False)

    fp = load().fingerprint()
    assert fp == load().fingerprint()                                     # deterministic
    assert fp["labels_csv"] == str(p.resolve()) and fp["features"]["path"] == str((tmp_path / "s.zarr").resolve())
    assert fp["features"]["slides"] == 4 and fp["features"]["encoder"] == ENC
    store["s2"].write_features(ENC, feats_of("s2", 5) + 1e-3, {})         # re-embedded
    assert load().fingerprint()["features"]["sha256"] != fp["features"]["sha256"]
    store["s2"].write_features(ENC, feats_of("s2", 5), {})
    assert load().fingerprint() == fp
    shutil.copytree(tmp_path / "s.zarr", tmp_path / "copy.zarr")
    moved = load(tmp_path / "copy.zarr").fingerprint()
    assert moved["features"]["sha256"] == fp["features"]["sha256"]
    assert moved["features"]["path"] == str((tmp_path / "copy.zarr").resolve()) != fp["features"]["path"]
    write_csv(p, ["slide_id", "label"], [[f"s{i}", "ab"[i % 2]] for i in range(4)] + [["other", "a"]])
    changed = load().fingerprint()
    assert changed["labels_sha256"] != fp["labels_sha256"] and changed["features"] == fp["features"]
    mem = Cohort([Bag("x", "x", 0, np.zeros((2, 3), np.float32), np.zeros((2, 2), np.int64))], ["a"], None, "e", "mem")
    assert mem.fingerprint()["features"]["kind"] == "memory" and mem.fingerprint()["labels_sha256"] is None


def test_csv_split_from_loaded_cohort(tmp_path):
    cohort_store(tmp_path / "s.zarr", {f"s{i}": 3 for i in range(6)})
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "split"],
                  [[f"s{i}", "tumor" if i % 2 else "normal", ["train", "train", "Val", "val", "test", "TEST"][i]]
                   for i in range(6)])
    c = load_cohort(p, store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    assert c.csv_split == ["train", "train", "val", "val", "test", "test"]
    (s,) = make_splits(c)
    assert (s.fold, s.train, s.val, s.test) == (0, [0, 1], [2, 3], [4, 5])
