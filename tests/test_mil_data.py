"""mil.data: labels CSV, class mapping, bags from the store and from CLAM / TRIDENT h5, splits, batches."""
from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
h5py = pytest.importorskip("h5py")

from mil.data import (Bag, BagBatcher, Cohort, class_mapping, load_cohort, make_splits,  # noqa: E402
                      read_labels_csv, write_splits)
from wsi.interop import h5_feature_files, read_h5_bag  # noqa: E402
from wsi.store import TileStore  # noqa: E402

ENC = "hf-hub:test/Enc"
DIM = 8


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def feats_of(sid: str, n: int, dim: int = DIM, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, sid)))
    return rng.standard_normal((n, dim)).astype(dtype)


def coords_of(n: int) -> np.ndarray:
    return np.stack([np.arange(n) * 256, np.arange(n) % 3 * 256], 1)


def make_store(path: Path, slides: dict[str, int], *, labels: dict[str, np.ndarray] | None = None,
               dtype=np.float32, incomplete: tuple[str, ...] = ()) -> TileStore:
    store = TileStore(path)
    for sid, n in slides.items():
        store.begin_slide(sid, {"source": f"{sid}.svs"})
        store.write_slide_arrays(sid, coords_of(n), np.zeros((2, 2), np.uint8), {"downsample": [1, 1]}, None)
        if sid in incomplete:
            store.create_features(sid, ENC, n, DIM, {})          # never finished: not complete
        else:
            store.write_features(sid, ENC, feats_of(sid, n, dtype=dtype), {})
        if labels and sid in labels:
            if hasattr(store, "write_labels"):
                store.write_labels(sid, "tumor", labels[sid].astype(np.float32), {})
            else:
                g = store.slide(sid)
                g.create_group("labels").create_array("tumor", data=labels[sid].astype(np.float32))
        store.mark_complete(sid)
    return store


def toy_cohort(n_patients: int = 30, pos_frac: float = 0.4, slides_per: int = 2, seed: int = 0,
               split: list[str] | None = None) -> Cohort:
    rng = np.random.default_rng(seed)
    bags = []
    for p in range(n_patients):
        y = int(p < pos_frac * n_patients)
        for s in range(1 + int(rng.integers(slides_per))):
            bags.append(Bag(f"s{p}_{s}", f"p{p}", y, np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64)))
    return Cohort(bags, ["normal", "tumor"], "tumor", "enc", "mem", split)


# ---- labels CSV --------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,rows,match", [
    (["slide_id", "diagnosis"], [["a", "x"]], "no 'label' column"),
    (["id", "label"], [["a", "x"]], "no 'slide_id' column"),
    (["slide_id", "label"], [["a", "x"], ["b", "y"], ["a", "y"]], "'a' appears twice"),
    (["slide_id", "label", "split"], [["a", "x", "train"], ["b", "y", "holdout"]], "line 3.*'holdout'"),
    (["slide_id", "label", "patient_id"], [["a", "normal", "P1"], ["b", "tumor", "P1"]], "patient 'P1'"),
    (["slide_id", "label"], [], "no rows"),
    (["slide_id", "label"], [["a", ""]], "line 2.*no label"),
])
def test_csv_errors_one_line_naming_file(tmp_path, header, rows, match):
    p = write_csv(tmp_path / "labels.csv", header, rows)
    with pytest.raises(ValueError, match=match) as e:
        read_labels_csv(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_csv_empty_and_missing_file(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("")
    with pytest.raises(ValueError, match="empty file") as e:
        read_labels_csv(p)
    assert str(p) in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_labels_csv(tmp_path / "nope.csv")
    q = tmp_path / "semi.csv"
    q.write_text("slide_id;label\na;x\n")
    with pytest.raises(ValueError, match="comma-separated"):
        read_labels_csv(q)


def test_csv_reads_defaults_and_splits(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("\ufeffSlide_ID, Label ,split\n a ,tumor, TRAIN\nb,normal,Validation\n\nc,normal,test\n")
    rows = read_labels_csv(p)
    assert [(r.slide_id, r.patient_id, r.label, r.split) for r in rows] == [
        ("a", "a", "tumor", "train"), ("b", "b", "normal", "val"), ("c", "c", "normal", "test")]


# ---- class mapping -----------------------------------------------------------------------------------
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
    with pytest.raises(ValueError, match=r"labels \['c'\] are not among the classes"):
        class_mapping(["a", "b", "c"], classes=["a", "b"])
    with pytest.raises(ValueError, match="'tumour' is not a class"):
        class_mapping(["tumor", "normal"], positive="tumour")
    with pytest.raises(ValueError, match="applies to two classes"):
        class_mapping(["a", "b", "c"], positive="a")


# ---- loading from a store ----------------------------------------------------------------------------
def test_load_from_store(tmp_path, caplog):
    make_store(tmp_path / "s.zarr", {"s1": 5, "s2": 7, "s3": 4, "s4": 6, "extra1": 3, "extra2": 3},
               labels={"s1": np.linspace(0, 1, 5), "s3": np.ones(4)}, incomplete=("s4",))
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "patient_id"],
                  [["s1", "tumor", "P1"], ["s2", "normal", ""], ["s3", "tumor", "P3"], ["s4", "normal", "P4"],
                   ["gone", "normal", "P5"]])
    with caplog.at_level(logging.WARNING, logger="mil.data"):
        c = load_cohort(p, store=tmp_path / "s.zarr", encoder=ENC, instance_labels="tumor", progress=False)
    assert [b.slide_id for b in c.bags] == ["s1", "s2", "s3"]
    assert [b.patient_id for b in c.bags] == ["P1", "s2", "P3"]
    assert c.class_names == ["normal", "tumor"] and c.positive_class == "tumor"
    assert c.labels().tolist() == [1, 0, 1] and c.patients().tolist() == ["P1", "s2", "P3"]
    assert c.dim == DIM and c.encoder == ENC and c.source == str(tmp_path / "s.zarr") and c.csv_split is None
    for b in c.bags:
        n = len(b.features)
        assert b.features.dtype == np.float32
        np.testing.assert_array_equal(b.features, feats_of(b.slide_id, n))
        np.testing.assert_array_equal(b.coords, coords_of(n))
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


def test_store_float16_kept_and_single_class(tmp_path):
    make_store(tmp_path / "s.zarr", {"a": 3, "b": 4, "c": 2}, dtype=np.float16)
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label"], [["a", "x"], ["b", "y"], ["c", "y"]])
    c = load_cohort(p, store=TileStore(tmp_path / "s.zarr", mode="r"), encoder=ENC, progress=False)
    assert c.bags[0].features.dtype == np.float16 and c.class_names == ["x", "y"]
    q = write_csv(tmp_path / "one.csv", ["slide_id", "label"], [["b", "y"], ["c", "y"], ["nofeat", "x"]])
    with pytest.raises(ValueError, match="every slide with features has label 'y'") as e:
        load_cohort(q, store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    assert str(q) in str(e.value)
    with pytest.raises(ValueError, match="none of its 1 slides"):
        load_cohort(write_csv(tmp_path / "n.csv", ["slide_id", "label"], [["zz", "x"]]),
                    store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    with pytest.raises(ValueError, match="exactly one of store"):
        load_cohort(p, encoder=ENC)
    with pytest.raises(ValueError, match="no tile store here"):
        load_cohort(p, store=tmp_path / "absent.zarr", encoder=ENC)


# ---- loading from CLAM / TRIDENT h5 ------------------------------------------------------------------
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
    assert a.source == str(clam) and b.source == str(job)
    assert a.class_names == b.class_names == ["normal", "tumor"]
    for x, y in zip(a.bags, b.bags):
        assert (x.slide_id, x.patient_id, x.label) == (y.slide_id, y.patient_id, y.label)
        np.testing.assert_array_equal(x.features, y.features)
        np.testing.assert_array_equal(x.coords, y.coords)
        np.testing.assert_array_equal(x.features, feats_of(x.slide_id, SLIDES[x.slide_id]))
        assert x.instance_labels is None and x.coords.dtype == np.int64
    with pytest.raises(ValueError, match="live in a tile store"):
        load_cohort(p, h5_dir=clam, encoder="uni_v1", instance_labels="tumor", progress=False)


# ---- splits --------------------------------------------------------------------------------------------
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
    with pytest.raises(ValueError, match="class 'tumor' has 3 patients, fewer than --folds 5; use --folds 3"):
        make_splits(c, 5)
    assert len(make_splits(c, 3)) == 3
    c1 = toy_cohort(n_patients=20, pos_frac=0.05)        # 1 tumor patient
    with pytest.raises(ValueError, match="class 'tumor' has 1 patient; a train/test split needs"):
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
    with pytest.raises(ValueError, match=f"labels.csv: patient '{pid}' has slides in test .* and train"):
        make_splits(c)
    c.csv_split = ["train"] * len(c.bags)
    with pytest.raises(ValueError, match="no slide with features in test"):
        make_splits(c)


def test_csv_split_from_loaded_cohort(tmp_path):
    make_store(tmp_path / "s.zarr", {f"s{i}": 3 for i in range(6)})
    p = write_csv(tmp_path / "l.csv", ["slide_id", "label", "split"],
                  [[f"s{i}", "tumor" if i % 2 else "normal", ["train", "train", "Val", "val", "test", "TEST"][i]]
                   for i in range(6)])
    c = load_cohort(p, store=tmp_path / "s.zarr", encoder=ENC, progress=False)
    assert c.csv_split == ["train", "train", "val", "val", "test", "test"]
    (s,) = make_splits(c)
    assert (s.fold, s.train, s.val, s.test) == (0, [0, 1], [2, 3], [4, 5])


def test_write_splits(tmp_path):
    c = toy_cohort(n_patients=12, seed=4)
    splits = make_splits(c, 3, seed=0)
    d = write_splits(c, splits, tmp_path / "run")
    assert d == tmp_path / "run" / "splits"
    assert sorted(p.name for p in d.iterdir()) == ["fold_0.csv", "fold_1.csv", "fold_2.csv"]
    for s in splits:
        with (d / f"fold_{s.fold}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["slide_id", "patient_id", "label", "part"]
        got = {r["slide_id"]: (r["patient_id"], r["label"], r["part"]) for r in rows}
        assert len(got) == len(rows) == len(c.bags)
        for part in ("train", "val", "test"):
            for i in getattr(s, part):
                b = c.bags[i]
                assert got[b.slide_id] == (b.patient_id, c.class_names[b.label], part)


# ---- batches -------------------------------------------------------------------------------------------
def _bags(sizes, dim=4, dtype=np.float32, with_labels=True) -> list[Bag]:
    out = []
    for i, n in enumerate(sizes):
        f = (np.arange(n * dim).reshape(n, dim) + 1000 * i).astype(dtype)
        lab = (np.arange(n) % 2).astype(np.float32) if with_labels else None
        out.append(Bag(f"b{i}", f"p{i}", i % 2, f, np.zeros((n, 2), np.int64), lab))
    return out


def test_batcher_padding_and_mask():
    bags = _bags([5, 3, 8, 1, 4], dtype=np.float16)
    bags[0].features[:] = np.float16(0.1)
    b = BagBatcher(bags, 2, shuffle=False, with_instance_labels=True)
    assert len(b) == 3
    batches = list(b)
    assert [x.index for x in batches] == [[0, 1], [2, 3], [4]]
    x = batches[0]
    assert x.x.dtype == torch.float32 and x.x.shape == (2, 5, 4) and x.mask.dtype == torch.bool
    assert x.mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    np.testing.assert_array_equal(x.x[0].numpy(), bags[0].features.astype(np.float32))   # float16 -> float32
    np.testing.assert_array_equal(x.x[1, :3].numpy(), bags[1].features.astype(np.float32))
    assert x.x[1, 3:].abs().sum() == 0
    assert x.y.dtype == torch.long and x.y.tolist() == [0, 1]
    assert x.instance_labels.tolist()[1] == [0, 1, 0, 0, 0] and x.selected == [None, None]
    bags[3].instance_labels = None
    assert [y.instance_labels is None for y in BagBatcher(bags, 2, shuffle=False, with_instance_labels=True)] == \
        [False, True, False]
    assert all(y.instance_labels is None for y in BagBatcher(bags, 2, shuffle=False))


def test_batcher_epochs_subsampling_and_order():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 60, 37).tolist()
    bags = _bags(sizes)
    b = BagBatcher(bags, 4, max_instances=20, seed=7, with_instance_labels=True)
    seen_sel = []
    orders = []
    for _ in range(3):
        idx, sel = [], {}
        for batch in b:
            assert batch.x.shape[1] <= 20 and len(batch.index) <= 4
            for r, (i, s) in enumerate(zip(batch.index, batch.selected)):
                n = sizes[i]
                k = int(batch.mask[r].sum())
                assert k == min(n, 20)
                if n > 20:
                    assert s is not None and len(s) == 20 and np.all(np.diff(s) > 0) and s.max() < n
                    np.testing.assert_array_equal(batch.x[r, :k].numpy(), bags[i].features[s])
                    np.testing.assert_array_equal(batch.instance_labels[r, :k].numpy(), bags[i].instance_labels[s])
                else:
                    assert s is None
                sel[i] = None if s is None else s.tolist()
            idx += batch.index
        assert sorted(idx) == list(range(len(bags)))              # every bag once per epoch
        seen_sel.append(sel)
        orders.append(idx)
    assert seen_sel[0] != seen_sel[1] and orders[0] != orders[1]   # fresh each epoch
    b2 = BagBatcher(bags, 4, max_instances=20, seed=7, with_instance_labels=True)
    again = [[bt.index for bt in b2] for _ in range(2)]
    b.set_epoch(0)
    assert again == [[bt.index for bt in b] for _ in range(2)]     # deterministic given seed and epoch
    assert [bt.index for bt in BagBatcher(bags, 4, max_instances=20, seed=8)] != again[0]
    # size buckets keep padding small: bags in a batch have similar sizes
    whole = BagBatcher(bags, 4, seed=1)
    pad = sum(bt.x.shape[0] * bt.x.shape[1] - int(bt.mask.sum()) for bt in whole)
    assert pad < 0.25 * sum(sizes)
    # shuffle=False: same order and same subsample every pass
    ev = BagBatcher(bags, 4, max_instances=20, shuffle=False)
    p1, p2 = list(ev), list(ev)
    assert [x.index for x in p1] == [list(range(i, min(i + 4, 37))) for i in range(0, 37, 4)]
    assert all(torch.equal(u.x, v.x) for u, v in zip(p1, p2))


def test_batcher_errors():
    with pytest.raises(ValueError, match="batch_size"):
        BagBatcher(_bags([2]), 0)
    with pytest.raises(ValueError, match="max_instances"):
        BagBatcher(_bags([2]), 2, max_instances=0)
    with pytest.raises(ValueError, match="without instances: b1"):
        BagBatcher(_bags([2, 0]), 2)
    mixed = _bags([2, 2])
    mixed[1].features = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="different feature widths"):
        BagBatcher(mixed, 2)
