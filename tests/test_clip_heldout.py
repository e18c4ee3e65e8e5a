"""Held-out figures of PathoCLIP: a run records the slides it learned from and zero-shot, retrieval and
the probe leave them out (unless --include-training-slides, said in the result file); zero-shot needs
the positive class to score fraction labels and --overwrite to replace stored predictions; the probe's
feature cache follows the weights, not the name."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from clip.cli import main
from clip.config import ClipTrainConfig
from clip.data import read_captions
from clip.models import load_model
from clip.probe import probe
from clip.retrieval import retrieve
from clip.train import train_clip
from clip.zeroshot import zeroshot
from conftest import make_store
from test_clip_train import FAST, colour_cohort
from wsi.errors import LabelsError, PathmilError, StoreError
from wsi.store import TileStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = {"normal": ["blue tissue"], "tumor": ["red tissue"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Four slides of 12 coloured tiles with fraction labels "red"; pathoclip-tiny trained one epoch on
    the captions of s0-s2 (s3 held out); the captions CSV of all four slides."""
    root = tmp_path_factory.mktemp("heldout")
    store, caps = colour_cohort(root, n_slides=4, per_slide=12)
    rows = list(csv.reader(open(caps)))
    st = TileStore.open(store)
    for k in range(4):
        red = np.array([0.9 if "red" in r[2] else 0.1 for r in rows[1:] if r[0] == f"s{k}"], np.float32)
        st[f"s{k}"].write_labels("red", red, {})
    train_caps = root / "train.csv"
    with open(train_caps, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r[0] != "s3"])
    out = root / "run"
    train_clip(ClipTrainConfig(**{**FAST, "epochs": 1}), train_caps, out, store=store, progress=False)
    return store, caps, out


def test_run_records_its_slides_and_evaluations_leave_them_out(run, tmp_path):
    store, caps, out = run
    assert json.loads((out / "config.json").read_text())["data"]["slides"] == ["s0", "s1", "s2"]
    enc = load_model(str(out))
    zs = zeroshot(enc, store, CLASSES, ["{}."], labels="red", positive="tumor", progress=False)
    assert zs["data"]["slides"] == ["s3"] and set(zs["probs"]) == {"s3"} and zs["metrics"]["n"] == 12
    assert zs["data"]["training_slides"] == {"run": str(out.resolve()), "excluded": ["s0", "s1", "s2"],
                                             "included": []}
    every = zeroshot(enc, store, CLASSES, ["{}."], labels="red", positive="tumor", include_training=True,
                     progress=False)
    assert every["data"]["slides"] == ["s0", "s1", "s2", "s3"]
    assert every["data"]["training_slides"]["included"] == ["s0", "s1", "s2"]
    with pytest.raises(PathmilError, match="every slide asked for was a training slide"):
        zeroshot(enc, store, CLASSES, ["{}."], slides=["s0"], progress=False)

    rt = retrieve(enc, read_captions(caps, store=store), store=store, progress=False)
    assert rt["data"]["slides"] == ["s3"] and rt["metrics"]["n_images"] == 12
    assert rt["data"]["training_slides"]["excluded"] == ["s0", "s1", "s2"]

    pb = probe(str(out), store, "red", shots=[2], n_subsets=2, test_slides=["s3"], progress=False)
    assert pb["data"]["test_slides"] == ["s3"] and pb["data"]["train_slides"] == ["s0", "s1", "s2"]
    with pytest.raises(PathmilError, match="test slide 's1' is a training slide"):
        probe(str(out), store, "red", shots=[2], n_subsets=2, test_slides=["s1", "s3"], progress=False)


def test_cli_result_file_says_which_slides_were_left_out(run, tmp_path, capsys):
    store, _, out = run
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": CLASSES, "templates": ["{}."], "positive": "tumor"}))
    base = ["-q", "zeroshot", "--model", str(out), "--store", str(store), "--classes", str(classes), "--labels", "red"]
    assert main([*base, "--out", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())["data"]
    assert a["slides"] == ["s3"] and a["training_slides"]["excluded"] == ["s0", "s1", "s2"]
    assert main([*base, "--include-training-slides", "--out", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())["data"]
    assert b["slides"] == ["s0", "s1", "s2", "s3"] and b["training_slides"]["included"] == ["s0", "s1", "s2"]


def test_fraction_labels_need_the_positive_class(run, tmp_path, capsys):
    store, _, _ = run
    torch.manual_seed(0)
    enc = load_model("pathoclip-tiny", random_init=True)
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": {"tumor": ["red tissue"], "normal": ["blue tissue"]},
                                   "templates": ["{}."]}))   # positive last would be "normal": refused
    capsys.readouterr()
    assert main(["zeroshot", "--model", "pathoclip-tiny", "--store", str(store), "--classes", str(classes),
                 "--labels", "red"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clip: error: ") and str(classes) in err and '"positive"' in err and "\n" not in err
    # with it, the file's order no longer matters
    a = zeroshot(enc, store, {"tumor": ["red tissue"], "normal": ["blue tissue"]}, ["{}."], labels="red",
                 positive="tumor", progress=False)
    b = zeroshot(enc, store, {"normal": ["blue tissue"], "tumor": ["red tissue"]}, ["{}."], labels="red",
                 positive="tumor", progress=False)
    assert list(a["config"]["classes"]) == ["normal", "tumor"] and a["config"]["positive"] == "tumor"
    for k in ("accuracy", "balanced_accuracy", "auc"):
        assert a["metrics"][k] == pytest.approx(b["metrics"][k])
    with pytest.raises(LabelsError, match="'positive' must name one of"):
        zeroshot(enc, store, CLASSES, ["{}."], labels="red", positive="red", progress=False)


def test_predictions_under_an_existing_name_need_overwrite(tmp_path, capsys):
    rng = np.random.default_rng(0)
    score = rng.random(4).astype(np.float32)
    st = make_store(tmp_path / "s.zarr", {"a": 4}, tiles=True, tile_size=32,
                    predictions={"abmil-w2s": {"a": {"instance_score": score}}})
    torch.manual_seed(0)
    enc = load_model("pathoclip-tiny", random_init=True)
    with pytest.raises(StoreError, match="already has predictions 'abmil-w2s'.*--overwrite"):
        zeroshot(enc, st.path, CLASSES, ["{}."], run="abmil-w2s", progress=False)
    arrays, _ = TileStore.open(st.path, readonly=True)["a"].predictions("abmil-w2s")
    assert set(arrays) == {"instance_score"} and np.array_equal(arrays["instance_score"], score)
    capsys.readouterr()
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classes": CLASSES, "templates": ["{}."]}))
    base = ["zeroshot", "--model", "pathoclip-tiny", "--store", str(st.path), "--classes", str(classes),
            "--name", "abmil-w2s"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "'abmil-w2s'" in err and "--overwrite" in err and "\n" not in err
    assert main(["-q", *base, "--overwrite"]) == 0
    arrays, attrs = TileStore.open(st.path, readonly=True)["a"].predictions("abmil-w2s")
    assert arrays["probs"].shape == (4, 2) and attrs["task"] == "zeroshot"


def test_probe_cache_follows_the_weights_file(tmp_path):
    """`--pretrained FILE` with a registry name: a second weights file is embedded again, not read from
    the first one's features cached under the same name."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    tiles = {s: rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8) for s in ("a", "b")}
    labels = {"y": {s: (np.arange(8) % 2).astype(np.float32) for s in tiles}}
    st = make_store(tmp_path / "s.zarr", {s: 8 for s in tiles}, tiles=tiles, tile_size=32, labels=labels)
    files = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = load_model("pathoclip-tiny", random_init=True).model.inner
        files.append(tmp_path / f"w{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(files[-1]))
    kw = dict(shots=[2], n_subsets=2, train_slides=["a"], test_slides=["b"], progress=False)
    one = probe("pathoclip-tiny", st.path, "y", pretrained=str(files[0]), **kw)
    f_one = TileStore.open(st.path, readonly=True)["a"].features("pathoclip-tiny")
    two = probe("pathoclip-tiny", st.path, "y", pretrained=str(files[1]), **kw)
    f_two = TileStore.open(st.path, readonly=True)["a"].features("pathoclip-tiny")
    assert one["model"]["digest"] != two["model"]["digest"] and not np.allclose(f_one, f_two)
    assert two["model"]["digest"] == load_model("pathoclip-tiny", pretrained=str(files[1])).digest()
    again = probe("pathoclip-tiny", st.path, "y", pretrained=str(files[0]), **kw)
    assert again["model"] == one["model"] and again["metrics"] == one["metrics"]


def test_training_slides_of_a_run_trained_from_shards(run, tmp_path):
    """A shards run records no slide list ("slides": null): its slides come from the shards' records."""
    from clip.heldout import leave_out_training, training_slides
    from clip.shards import write_shards
    from wsi.errors import RunError

    store, caps, _ = run
    two = tmp_path / "two.csv"
    rows = list(csv.reader(open(caps)))
    with open(two, "w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [r for r in rows[1:] if r[0] in ("s1", "s2")])
    write_shards(read_captions(two, store=store), tmp_path / "shards", per_shard=10)
    fake = tmp_path / "shard_run"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"data": {"source": str(tmp_path / "shards"), "slides": None}}))
    assert training_slides(fake) == ["s1", "s2"]
    kept, held = leave_out_training(f"pathoclip:{fake}", ["s0", "s1", "s2", "s3"])
    assert kept == ["s0", "s3"] and held["excluded"] == ["s1", "s2"]
    (fake / "config.json").write_text(json.dumps({"data": {"source": str(tmp_path / "gone"), "slides": None}}))
    with pytest.raises(RunError, match="does not record which slides.*--include-training-slides"):
        training_slides(fake)
