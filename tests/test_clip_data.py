"""clip.data / clip.shards / clip.captions: caption CSVs of store tiles and image files, bad rows, the
split by slide, PairDataset under DataLoader workers, WebDataset shards, captions made from labels."""
from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from clip.captions import (EVAL_CLASSES, EVAL_TEMPLATES, TRAIN_SYNONYMS, TRAIN_TEMPLATES, captions_from_labels,
                           write_classes_json)
from clip.data import Captions, CaptionsError, PairDataset, read_captions, split_by_group
from clip.shards import shard_count, shard_pairs, write_shards
from wsi.errors import PathmilError

from conftest import make_store, tile_coords, write_png


def smooth_tiles(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Tiles of one colour plus a gentle gradient each: JPEG keeps them close (unlike noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 40, size, dtype=np.float32)[None, :, None]
    base = rng.integers(30, 200, (n, 1, 1, 3)).astype(np.float32)
    return np.clip(base + ramp, 0, 255).astype(np.uint8).repeat(size, axis=1)


@pytest.fixture()
def store(tmp_path):
    """Slides a (6 tiles), b (4), c (5) with smooth stored tiles; d is features-only (no pixels)."""
    sizes = {"a": 6, "b": 4, "c": 5}
    st = make_store(tmp_path / "s.zarr", sizes, tiles={s: smooth_tiles(n, seed=i) for i, (s, n) in
                                                       enumerate(sizes.items())})
    make_store(tmp_path / "s.zarr", {"d": {"n": 3, "kind": "features-only"}})
    return st


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_tile_csv_several_captions_per_tile(tmp_path, store):
    p = write_csv(tmp_path / "c.csv", [["slide_id", "tile", "caption"], ["a", 0, "tumor"], ["a", 0, "carcinoma"],
                                       ["b", 3, "normal tissue"], ["a", 5, "stroma"], ["a", 0, "tumour cells"]])
    caps = read_captions(p, store=store)
    assert caps.images == [("tile", "a", 0), ("tile", "b", 3), ("tile", "a", 5)]
    assert caps.captions == [(0, "tumor"), (0, "carcinoma"), (1, "normal tissue"), (2, "stroma"), (0, "tumour cells")]
    assert caps.texts_of(0) == ["tumor", "carcinoma", "tumour cells"]
    assert [caps.group_of(i) for i in range(3)] == ["a", "b", "a"]
    assert caps.dropped == [] and caps.store_path == store.path
    assert caps.summary() == "5 captions of 3 images from 2 slides"
    assert read_captions(p, store=store.path).captions == caps.captions      # a store path works too


def test_xy_csv_maps_to_the_exact_index(tmp_path, store):
    xy = tile_coords(6, 32)   # the fixture's grid
    p = write_csv(tmp_path / "c.csv", [["slide_id", "x", "y", "caption"], ["a", *xy[4], "four"],
                                       ["c", 0, 0, "zero"], ["a", *xy[4], "four again"], ["a", 33, 0, "off grid"]])
    caps = read_captions(p, store=store)
    assert caps.images == [("tile", "a", 4), ("tile", "c", 0)]
    assert caps.texts_of(0) == ["four", "four again"]
    assert caps.dropped == [(5, "x,y 33,0 is not a stored tile of slide 'a'")]


def test_image_file_csvs(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        write_png(tmp_path / "img" / f"{i}.png", smooth_tiles(1, 24, seed=i)[0])
    p = write_csv(tmp_path / "files.csv", [["image_path", "caption"], ["img/0.png", "a"], ["img/1.png", "b"],
                                           [str(tmp_path / "img" / "0.png"), "a2"]])
    caps = read_captions(p)
    assert caps.images == [("file", str(tmp_path / "img" / "0.png")), ("file", str(tmp_path / "img" / "1.png"))]
    assert caps.texts_of(0) == ["a", "a2"] and caps.group_of(1) == str(tmp_path / "img" / "1.png")
    assert caps.summary() == "3 captions of 2 images"
    # open_clip's own defaults: tab-separated filepath,title
    tsv = tmp_path / "oc.tsv"
    tsv.write_text("filepath\ttitle\timg/2.png\tthird\n".replace("\timg", "\nimg"))
    assert read_captions(tsv).captions == [(0, "third")]
    # named columns (open_clip's --csv-img-key / --csv-caption-key) and a slide_id column for grouping
    q = write_csv(tmp_path / "k.csv", [["slide_id", "img", "text"], ["s1", "img/0.png", "x"], ["s1", "img/1.png", "y"],
                                       ["s2", "img/2.png", "z"]])
    caps = read_captions(q, image_key="img", caption_key="text")
    assert [caps.group_of(i) for i in range(3)] == ["s1", "s1", "s2"]
    assert caps.summary() == "3 captions of 3 images from 2 slides"


def test_bad_rows_are_reported_with_line_numbers_and_skipped(tmp_path, store):
    p = write_csv(tmp_path / "c.csv", [["slide_id", "tile", "caption"], ["a", 1, "ok"], ["zz", 0, "no slide"],
                                       ["a", 900, "out of range"], ["b", "x", "not a number"], ["b", 2, "  "],
                                       [], ["", 1, "no id"], ["d", 0, "no pixels"], ["c", 4, "ok too"]])
    caps = read_captions(p, store=store)
    assert caps.captions == [(0, "ok"), (1, "ok too")]
    assert caps.dropped == [(3, "slide 'zz' is not in the store"), (4, "tile 900 out of range (slide has 6 tiles)"),
                            (5, "tile 'x' is not an integer"), (6, "has an empty caption"), (8, "has no slide_id"),
                            (9, "slide 'd' has no pixels (a features-only import)")]
    assert caps.summary().startswith("2 captions of 2 images from 2 slides; 6 rows dropped: line 3 slide 'zz' is "
                                     "not in the store, line 4 tile 900 out of range (slide has 6 tiles), line 5")
    assert caps.summary().endswith("... (3 more)")
    write_png(tmp_path / "good.png", smooth_tiles(1)[0])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    f = write_csv(tmp_path / "f.csv", [["image_path", "caption"], ["good.png", "fine"], ["gone.png", "missing"],
                                       ["broken.png", "unreadable"], ["", "no path"]])
    caps = read_captions(f)
    assert caps.captions == [(0, "fine")]
    assert caps.dropped == [(3, "image file 'gone.png' not found"),
                            (4, "image file 'broken.png' unreadable (UnidentifiedImageError)"), (5, "has no image path")]


def test_unusable_csvs_raise_one_line_errors(tmp_path, store):
    wrong = write_csv(tmp_path / "w.csv", [["slide", "text"], ["a", "x"]])
    with pytest.raises(PathmilError, match=r"w\.csv: columns 'slide,text' are not a captions CSV; expected "
                                           r"slide_id,tile,caption or slide_id,x,y,caption"):
        read_captions(wrong, store=store)
    bad = write_csv(tmp_path / "b.csv", [["slide_id", "tile", "caption"], ["zz", 0, "x"], ["a", 99, "y"]])
    with pytest.raises(CaptionsError, match=r"b\.csv: no usable caption rows \(2 dropped: line 2 slide 'zz' is not "
                                            r"in the store; line 3 tile 99 out of range"):
        read_captions(bad, store=store)
    with pytest.raises(CaptionsError, match=r"b\.csv: captions of store tiles \(slide_id,tile\) need the tile store"):
        read_captions(bad)
    with pytest.raises(CaptionsError, match="no such captions CSV"):
        read_captions(tmp_path / "none.csv")
    for e in (wrong, bad):
        try:
            read_captions(e, store=store)
        except CaptionsError as err:
            assert "\n" not in str(err)


def _groups_caps(sizes: dict[str, int]) -> Captions:
    images = [("tile", s, i) for s, n in sizes.items() for i in range(n)]
    return Captions(images, [(k, f"c{k}") for k in range(len(images))], [k[1] for k in images])


def test_split_by_group_never_shares_a_slide_and_is_deterministic():
    caps = _groups_caps({f"s{i}": 3 + (i * 7) % 11 for i in range(12)})
    n = len(caps.images)
    for seed in range(5):
        for frac in (0.1, 0.25, 0.5):
            tr, va = split_by_group(caps, frac, seed)
            assert sorted(tr + va) == list(range(n)) and va
            assert not {caps.group_of(i) for i in tr} & {caps.group_of(i) for i in va}
            assert abs(len(va) / n - frac) < 0.15
            assert (tr, va) == split_by_group(caps, frac, seed)
    assert split_by_group(caps, 0.25, 0) != split_by_group(caps, 0.25, 1)
    assert split_by_group(caps, 0.0, 0) == (list(range(n)), [])
    with pytest.raises(CaptionsError, match="one slide"):
        split_by_group(_groups_caps({"only": 5}), 0.2, 0)


def test_pair_dataset_with_dataloader_workers(tmp_path, store):
    from open_clip.transform import image_transform

    write_png(tmp_path / "f.png", smooth_tiles(1, 40, seed=9)[0])
    p = write_csv(tmp_path / "c.csv", [["slide_id", "tile", "caption"]] +
                  [[s, i, f"{s}{i}-{k}"] for s, n in (("a", 6), ("c", 5)) for i in range(n) for k in range(3)])
    tiles = read_captions(p, store=store)
    caps = Captions(tiles.images + [("file", str(tmp_path / "f.png"))], tiles.captions + [(11, "file")],
                    tiles.groups + ["f"], store_path=store.path)       # a file among the tiles
    raw = PairDataset(caps)
    img, text = raw[4]
    assert torch.equal(img, torch.from_numpy(store["a"].read_tiles([4])[0])) and text.startswith("a4-")
    assert raw[len(raw) - 1][0].shape == (40, 40, 3)
    # one item per image; the caption follows (seed, epoch), and the epochs go through all captions
    seen = set()
    for epoch in range(12):
        raw.set_epoch(epoch)
        seen.add(raw.caption(0))
        assert raw.caption(0) == raw.texts[0][int(np.random.default_rng((0, epoch, 0)).integers(3))]
    assert seen == {"a0-0", "a0-1", "a0-2"} and len(raw) == 12
    ds = PairDataset(caps, list(range(12)), image_transform(32, is_train=False))
    ds.set_epoch(3)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork")
    got_imgs, got_txt = [], []
    for x, t in loader:
        got_imgs.append(x)
        got_txt += list(t)
    x = torch.cat(got_imgs)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    assert got_txt == [ds.caption(i) for i in range(12)]
    assert torch.allclose(x[7], ds[7][0])


def test_shards_round_trip(tmp_path, store):
    from PIL import Image

    write_png(tmp_path / "p.png", smooth_tiles(1, 20, seed=5)[0])
    Image.fromarray(smooth_tiles(1, 24, seed=6)[0]).save(tmp_path / "j.jpg", quality=80)
    p = write_csv(tmp_path / "c.csv", [["slide_id", "tile", "caption"], ["a", 1, "one"], ["b", 2, "two"],
                                       ["a", 1, "one bis"], ["c", 4, "four"], ["b", 0, "zero"]])
    caps = read_captions(p, store=store)
    paths = write_shards(caps, tmp_path / "sh", per_shard=2)
    assert [q.name for q in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert json.loads((tmp_path / "sh" / "sizes.json").read_text()) == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}
    assert shard_count(tmp_path / "sh") == 5
    pairs = list(shard_pairs(tmp_path / "sh", shuffle=0))
    want = [(pos, t) for pos in range(len(caps.images)) for t in caps.texts_of(pos)]   # once per caption
    assert [t for _, t in pairs] == [t for _, t in want] == ["one", "one bis", "two", "four", "zero"]
    for (img, _), (pos, _) in zip(pairs, want):
        _, sid, idx = caps.images[pos]
        diff = np.abs(np.asarray(img, np.int16) - store[sid].read_tiles([idx])[0].astype(np.int16))
        assert img.mode == "RGB" and img.size == (16, 16) and diff.mean() < 2.5
    with pytest.raises(CaptionsError, match="already holds 3 shards"):
        write_shards(caps, tmp_path / "sh")
    # shuffled: the same pairs, another order per epoch, reproducible; a brace pattern; DataLoader workers
    ds = shard_pairs(str(tmp_path / "sh" / "shard-{000000..000002}.tar"), shuffle=10, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append([t for _, t in ds])
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] == orders[2]
    loader = torch.utils.data.DataLoader(shard_pairs(tmp_path / "sh", lambda im: torch.from_numpy(np.asarray(im))),
                                         batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert sorted(t for _, t in loader) == sorted(t for _, t in want)
    # image files: JPEGs are copied byte for byte, other images encoded
    f = write_csv(tmp_path / "f.csv", [["image_path", "caption"], ["j.jpg", "jay"], ["p.png", "pee"]])
    write_shards(read_captions(f), tmp_path / "fs", per_shard=10)
    with tarfile.open(tmp_path / "fs" / "shard-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["000000000.jpg"] == (tmp_path / "j.jpg").read_bytes()
    assert members["000000001.txt"] == b"pee" and members["000000001.jpg"][:2] == b"\xff\xd8"
    assert json.loads(members["000000000.json"]) == {"image_path": str(tmp_path / "j.jpg"),
                                                      "group": str(tmp_path / "j.jpg")}


def test_corrupt_shard_sample_is_skipped_with_a_warning(tmp_path):
    import webdataset as wds
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(smooth_tiles(1)[0]).save(buf, format="JPEG")
    with wds.TarWriter(str(tmp_path / "shard-000000.tar")) as w:
        w.write({"__key__": "000", "jpg": buf.getvalue(), "txt": "good"})
        w.write({"__key__": "001", "jpg": b"\xff\xd8 truncated", "txt": "bad"})
        w.write({"__key__": "002", "jpg": buf.getvalue(), "txt": "good too"})
    with pytest.warns(UserWarning):
        got = [t for _, t in shard_pairs(tmp_path, shuffle=0)]
    assert got == ["good", "good too"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionsError, match="empty: no .tar shards"):
        shard_pairs(tmp_path / "empty")
    with pytest.raises(CaptionsError, match=r"shard-000001.tar: no such shard \(9 of 10 missing\)"):
        shard_pairs(str(tmp_path / "shard-{000000..000009}.tar"))


def test_captions_from_labels(tmp_path):
    n = {"a": 40, "b": 30, "c": 10}
    rng = np.random.default_rng(0)
    lab = {s: rng.random(k).astype(np.float32) for s, k in n.items() if s != "c"}
    lab["a"][:3] = np.nan                                          # unlabelled tiles
    st = make_store(tmp_path / "s.zarr", n, labels={"tumor": lab})
    out = tmp_path / "caps.csv"
    s = captions_from_labels(st, "tumor", out, per_tile=3, seed=1)
    pos = {s_: k for k, s_ in enumerate(("normal", "tumor"))}
    want = {sid: (v[~np.isnan(v)] > 0.5).sum() for sid, v in lab.items()}
    assert s["per_class"]["tumor"] == sum(want.values()) and s["tiles"] == 67 and s["rows"] == 3 * 67
    assert s["unlabelled_tiles"] == 3 and s["skipped_slides"] == {"c": "no labels 'tumor'"}
    caps = read_captions(out, store=st)                           # what it writes, read_captions reads
    assert caps.dropped == [] and len(caps.images) == 67
    combos = {c: {t.format(w): c for t in TRAIN_TEMPLATES for w in TRAIN_SYNONYMS[c]} for c in pos}
    which = {text: c for c in combos for text in combos[c]}
    use = Counter()
    for k, (_, sid, idx) in enumerate(caps.images):
        texts = caps.texts_of(k)
        assert len(set(texts)) == 3                                # varied per tile
        truth = "tumor" if lab[sid][idx] > 0.5 else "normal"
        assert {which[t] for t in texts} == {truth}                # every caption names the tile's class
        use.update(texts)
    for c in pos:                                                  # each template x synonym used evenly
        counts = [use[t] for t in combos[c]]
        assert len(counts) == 40 and max(counts) - min(counts) <= 1
    assert captions_from_labels(st, "tumor", tmp_path / "again.csv", per_tile=3, seed=1)["rows"] == s["rows"]
    assert (tmp_path / "again.csv").read_text() == out.read_text()
    bal = captions_from_labels(st, "tumor", tmp_path / "bal.csv", balance_classes=True, classes=["benign", "cancer"],
                               synonyms={"benign": ["benign tissue"], "cancer": ["cancer"]}, templates=["{}."])
    assert bal["per_class"]["benign"] == bal["per_class"]["cancer"] == min(s["per_class"].values())
    assert set(read_captions(tmp_path / "bal.csv", store=st).captions[i][1] for i in range(bal["rows"])) == \
        {"benign tissue.", "cancer."}
    with pytest.raises(CaptionsError, match="no tile has labels 'nope'.*wsi labels"):
        captions_from_labels(st, "nope", tmp_path / "x.csv")


def test_eval_prompts_differ_from_training_and_classes_json(tmp_path):
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    for c, words in EVAL_CLASSES.items():
        assert not set(words) & set(TRAIN_SYNONYMS[c])
    assert list(EVAL_CLASSES)[-1] == "tumor"                       # the positive class is the last one
    obj = json.loads(write_classes_json(tmp_path / "classes.json").read_text())
    assert obj == {"classes": {k: list(v) for k, v in EVAL_CLASSES.items()}, "templates": list(EVAL_TEMPLATES),
                   "positive": "tumor"}
