"""PathoCLIP evaluation: Recall@K against a hand-computed example (several captions per image), zero-shot
on a separable set after a short real training of pathoclip-tiny, predictions written to the store,
the few-shot probe's determinism and skipped shot counts, and the result-file schema."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from clip.embedding import embed_texts, embed_tiles
from clip.models import load_model
from clip.probe import cached_features, embed_spec, few_shot, probe, split_slides
from clip.results import SCHEMA, read_result, write_result
from clip.retrieval import embed_images, recall_at_k, retrieve
from clip.zeroshot import class_vectors, read_classes, tile_targets, zeroshot
from conftest import make_store
from wsi.errors import LabelsError, PathmilError
from wsi.store import TileStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"blue": (50, 60, 200), "green": (50, 180, 60), "red": (200, 50, 60), "yellow": (210, 200, 50)}
NAMES = np.array(list(COLOURS))


def colour_tiles(rng: np.random.Generator, names, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 3) noisy tiles of the named colours."""
    base = np.array([COLOURS[c] for c in names], np.int16)[:, None, None, :]
    return np.clip(base + rng.integers(-40, 41, (len(names), size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained():
    """pathoclip-tiny trained for 60 steps with open_clip's ClipLoss on tiles of four colours captioned
    "a photo of <colour> tissue." (about 3 s on one CPU thread)."""
    from open_clip import ClipLoss

    torch.manual_seed(0)
    enc = load_model("pathoclip-tiny", random_init=True)
    rng = np.random.default_rng(0)
    model, loss_fn = enc.model.inner, ClipLoss()
    tokens = {c: enc.tokenize([f"a photo of {c} tissue."])[0] for c in COLOURS}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(60):
        names = rng.choice(NAMES, 16)
        img = model.encode_image(enc.preprocess(torch.from_numpy(colour_tiles(rng, names))), normalize=True)
        txt = model.encode_text(torch.stack([tokens[c] for c in names]), normalize=True)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
    return enc


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory):
    """Three slides of 24 coloured 32 px tiles (s1, s2: four colours; s3: red and blue only). Labels
    "colour": class indices into COLOURS; "red": fractions, > 0.5 on red tiles only."""
    rng = np.random.default_rng(1)
    tiles, colour, red, truth = {}, {}, {}, {}
    for sid, pool in [("s1", NAMES), ("s2", NAMES), ("s3", ["blue", "red"])]:
        names = rng.choice(pool, 24)
        tiles[sid] = colour_tiles(rng, names)
        colour[sid] = truth[sid] = np.searchsorted(NAMES, names)
        red[sid] = np.where(names == "red", rng.uniform(0.55, 1.0, 24), rng.uniform(0.0, 0.45, 24))
    path = tmp_path_factory.mktemp("clip_eval") / "colours.zarr"
    make_store(path, {s: 24 for s in tiles}, tiles=tiles, labels={"colour": colour, "red": red})
    return SimpleNamespace(path=path, tiles=tiles, truth=truth)


# ---- retrieval ------------------------------------------------------------------------------------
def test_recall_hand_computed_several_captions_per_image():
    # images 0, 1, 2; captions 0, 1 -> image 0, caption 2 -> image 1, captions 3, 4 -> image 2
    owner = np.array([0, 0, 1, 2, 2])
    sim = np.array([[0.9, 0.1, 0.8, 0.2, 0.3],
                    [0.7, 0.6, 0.5, 0.9, 0.1],
                    [0.2, 0.3, 0.4, 0.1, 0.35]])
    r = recall_at_k(sim, owner, ks=(1, 2, 5))
    # image -> text, rank of the best own caption: image 0: caption 0 first (rank 0); image 1: caption 2
    # behind 0.9, 0.7, 0.6 (rank 3); image 2: caption 4 (0.35) behind caption 2 (0.4) only (rank 1),
    # though its caption 3 is last: any caption of the image counts.
    assert r["image_to_text"] == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3, "R@5": 1.0})
    # text -> image, rank of the caption's image in its column: 0, 2, 1, 2, 0
    assert r["text_to_image"] == pytest.approx({"R@1": 2 / 5, "R@2": 3 / 5, "R@5": 1.0})
    assert r["mean_recall"] == pytest.approx(np.mean([1 / 3, 2 / 3, 1, 2 / 5, 3 / 5, 1]))
    assert (r["n_images"], r["n_texts"]) == (3, 5)


def test_recall_ties_count_against_the_query_and_bad_owner():
    r = recall_at_k(np.zeros((4, 4)), np.arange(4), ks=(1, 4))
    assert r["image_to_text"] == {"R@1": 0.0, "R@4": 1.0} and r["text_to_image"] == {"R@1": 0.0, "R@4": 1.0}
    with pytest.raises(ValueError, match="image index in 0..3"):
        recall_at_k(np.zeros((4, 2)), np.array([0, 4]))


def test_retrieve_tiles_and_files(trained, colour_store, tmp_path):
    from PIL import Image

    st = colour_store
    png = tmp_path / "tile.png"
    Image.fromarray(st.tiles["s2"][5]).save(png)  # the same pixels as tile 5 of s2, as a file
    images = [("tile", "s2", 5), ("file", str(png)), ("tile", "s1", 3), ("tile", "s1", 0), ("tile", "s3", 7)]
    emb = embed_images(trained, images, st.path, batch_size=8, progress=False)
    alone = embed_tiles(trained, st.path, [("s1", 3)], progress=False)
    assert emb.shape == (5, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(emb[2], alone[0], atol=1e-5)                  # order kept across slides
    assert np.allclose(emb[0], emb[1], atol=1e-4)                    # a file and the same stored tile
    colour = lambda key: NAMES[st.truth[key[1]][key[2]]]  # noqa: E731
    caps = SimpleNamespace(images=images[2:], captions=[(i, f"{w} {colour(images[2 + i])} tissue.")
                                                         for i in range(3) for w in ("a photo of", "an image of")])
    res = retrieve(trained, caps, st.path, ks=(1, 3), progress=False)
    r = res["metrics"]
    assert (r["n_images"], r["n_texts"]) == (3, 6) and res["data"]["slides"] == ["s1", "s3"]
    assert r["image_to_text"]["R@3"] == 1.0 and r["text_to_image"]["R@3"] == 1.0
    with pytest.raises(PathmilError, match="--store"):
        retrieve(trained, caps, None, progress=False)


# ---- zero-shot ------------------------------------------------------------------------------------
def test_zeroshot_separable_set_beats_chance(trained, colour_store):
    st = colour_store
    classes = {c: [c, f"bright {c}"] for c in COLOURS}
    templates = ["an image of {} tissue.", "{} tissue."]  # prompts other than the training caption
    w = class_vectors(trained, classes, templates)
    assert w.shape == (32, 4) and torch.allclose(w.norm(dim=0), torch.ones(4), atol=1e-5)
    # column = normalised mean of every template x synonym text embedding (not of per-synonym means)
    mean = embed_texts(trained, [t.format(s) for t in templates for s in classes["red"]]).mean(0)
    assert np.allclose(w[:, 2].numpy(), mean / np.linalg.norm(mean), atol=1e-5)

    res = zeroshot(trained, st.path, classes, templates, labels="colour", batch_size=16, progress=False)
    m = res["metrics"]
    assert m["n"] == m["n_labelled"] == 72 and res["data"]["slides"] == ["s1", "s2", "s3"]
    assert res["config"]["run"] is None and res["model"]["name"] == "pathoclip-tiny"
    assert m["accuracy"] > 0.9 and m["balanced_accuracy"] > 0.9 and m["auc"] > 0.95, m  # chance: 0.25
    truth = np.concatenate(list(st.truth.values()))
    assert {c: v["n"] for c, v in m["per_class"].items()} == {c: int((truth == k).sum()) for k, c in enumerate(NAMES)}
    assert sum(m["predicted"].values()) == 72

    torch.manual_seed(0)  # the same architecture untrained: four classes are not matched by chance
    untrained = zeroshot(load_model("pathoclip-tiny", random_init=True), st.path, classes, templates,
                         labels="colour", progress=False)["metrics"]
    assert untrained["balanced_accuracy"] < 0.6, untrained


def test_zeroshot_binary_fraction_labels_and_predictions_in_the_store(trained, colour_store):
    st = colour_store
    res = zeroshot(trained, st.path, {"blue": ["blue"], "red": ["red"]}, ["an image of {} tissue."],
                   slides=["s3"], labels="red", run="zs-colours", progress=False, positive="red")
    m = res["metrics"]
    assert m["n_labelled"] == 24 and m["balanced_accuracy"] > 0.9 and m["auc"] > 0.95, m
    arrays, attrs = TileStore.open(st.path, readonly=True)["s3"].predictions("zs-colours")
    assert arrays["probs"].shape == (24, 2) and np.allclose(arrays["probs"].sum(1), 1, atol=1e-5)
    assert np.allclose(arrays["instance_score"], arrays["probs"][:, 1])  # the last class is the positive one
    assert np.array_equal(arrays["predicted"], arrays["probs"].argmax(1))
    assert np.mean(arrays["predicted"] == (NAMES[st.truth["s3"]] == "red")) > 0.9
    assert attrs["class_names"] == ["blue", "red"] and attrs["positive_class"] == "red"
    assert attrs["task"] == "zeroshot" and attrs["model"] == "pathoclip-tiny"
    assert np.allclose(res["probs"]["s3"], arrays["probs"])
    assert "zs-colours" not in TileStore.open(st.path, readonly=True)["s1"].prediction_names()


def test_zeroshot_errors(trained, colour_store):
    with pytest.raises(PathmilError, match="prediction name"):
        zeroshot(trained, colour_store.path, {"a": ["a"], "b": ["b"]}, ["{}"], run="bad name", progress=False)
    with pytest.raises(PathmilError, match="no labels 'nope'.*wsi labels"):
        zeroshot(trained, colour_store.path, {"a": ["a"], "b": ["b"]}, ["{}"], labels="nope", progress=False)
    with pytest.raises(LabelsError, match="binary fraction labels need exactly 2 classes"):
        zeroshot(trained, colour_store.path, {"a": ["a"], "b": ["b"], "c": ["c"]}, ["{}"], labels="red",
                 progress=False)


def test_read_classes(tmp_path):
    p = tmp_path / "CLASSES.json"
    p.write_text(json.dumps({"classes": {"tumor": ["tumor", "carcinoma"], "normal": "normal tissue"},
                             "templates": ["an H&E image of {}."], "positive": "tumor"}))
    classes, templates = read_classes(p)
    assert list(classes) == ["normal", "tumor"]  # the positive class goes last
    assert classes["normal"] == ["normal tissue"] and templates == ["an H&E image of {}."]
    for doc, msg in [({"classes": {"a": ["a"]}, "templates": ["{}"]}, "at least two class names"),
                     ({"classes": {"a": ["a"], "b": []}, "templates": ["{}"]}, "class 'b' needs"),
                     ({"classes": {"a": ["a"], "b": ["b"]}}, "'templates' must be"),
                     ({"classes": {"a": ["a"], "b": ["b"]}, "templates": ["no slot"]}, "exactly one {}"),
                     ({"classes": {"a": ["a"], "b": ["b"]}, "templates": ["{}"], "positive": "c"}, "'positive'")]:
        p.write_text(json.dumps(doc))
        with pytest.raises(LabelsError, match=msg) as e:
            read_classes(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    p.write_text("{not json")
    with pytest.raises(LabelsError, match="cannot read the classes file"):
        read_classes(p)


def test_tile_targets():
    assert tile_targets(np.array([0.2, 0.5, 0.51, np.nan, 1.0]), 2, "x").tolist() == [0, 0, 1, -1, 1]
    assert tile_targets(np.array([0, 2, 1], np.float32), 3, "x").tolist() == [0, 2, 1]
    with pytest.raises(LabelsError, match="x: class indices 0..3 do not fit the 3 classes"):
        tile_targets(np.array([0, 3.0]), 3, "x")
    with pytest.raises(LabelsError, match="neither class indices nor fractions"):
        tile_targets(np.array([0.5, 2.5]), None, "x")


# ---- few-shot probe -------------------------------------------------------------------------------
def test_few_shot_protocol_deterministic_and_skips():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], [40, 12])
    x = rng.standard_normal((52, 16)) + 3.0 * np.eye(16)[y]            # two separable classes
    yt = np.repeat([0, 1], 30)
    xt = rng.standard_normal((60, 16)) + 3.0 * np.eye(16)[yt]
    a = few_shot(x, y, xt, yt, shots=(2, 8, 16), n_subsets=3, seed=42)
    b = few_shot(x, y, xt, yt, shots=(2, 8, 16), n_subsets=3, seed=42)
    c = few_shot(x, y, xt, yt, shots=(2, 8, 16), n_subsets=3, seed=7)
    assert a == b and a["shots"] != c["shots"]
    assert list(a["shots"]) == ["2", "8"] and a["skipped"] == {"16": "16 shots > the 12 training tiles of class 1"}
    acc = a["shots"]["8"]["balanced_accuracy"]
    assert len(acc["values"]) == 3 and acc["mean"] > 0.9
    assert acc["std"] == pytest.approx(np.std(acc["values"]))
    with pytest.raises(LabelsError, match="two or more"):
        few_shot(x, np.zeros(52, int), xt, yt)


def test_probe_on_store_caches_features_and_is_deterministic(colour_store, tmp_path):
    import shutil

    path = tmp_path / "colours.zarr"
    shutil.copytree(colour_store.path, path)
    assert split_slides(["s3", "s1", "s2"], 0.3, seed=0) == split_slides(["s1", "s2", "s3"], 0.3, seed=0)
    torch.manual_seed(0)
    kw = dict(shots=(2, 4, 20), n_subsets=3, train_slides=["s1", "s2"], test_slides=["s3"], progress=False)
    a = probe("pathoclip-tiny", path, "red", random_init=True, **kw)
    assert TileStore.open(path, readonly=True)["s1"].has_features("pathoclip-tiny")
    b = probe("pathoclip-tiny", path, "red", random_init=True, **kw)  # from the cached features
    assert a == b and a["model"]["name"] == "pathoclip-tiny" and a["model"]["weights"] == "random-init"
    assert a["data"]["train_slides"] == ["s1", "s2"] and a["config"]["split"] == "given"
    m = a["metrics"]
    red = {s: int((t == 2).sum()) for s, t in colour_store.truth.items()}  # class 1: red (fraction > 0.5)
    assert m["classes"]["1"] == {"train": red["s1"] + red["s2"], "test": red["s3"]}
    assert red["s1"] + red["s2"] < 20 and list(m["shots"]) == ["2", "4"]
    assert m["skipped"] == {"20": f"20 shots > the {red['s1'] + red['s2']} training tiles of class 1"}
    assert m["n_train"] == 48 and m["n_test"] == 24
    # features from other weights (another digest) are embedded again
    old = cached_features(path, "pathoclip-tiny", ["s1"], pretrained=False)["s1"]
    new = cached_features(path, "pathoclip-tiny", ["s1"], pretrained=False, digest="0" * 16)["s1"]
    assert old.shape == new.shape == (24, 32) and not np.allclose(old, new)


# ---- result files ---------------------------------------------------------------------------------
def test_embed_spec(tmp_path):
    assert embed_spec("pathoclip-tiny") == ("pathoclip-tiny", None, True)
    assert embed_spec("pathoclip-tiny", random_init=True) == ("pathoclip-tiny", None, False)
    assert embed_spec("ViT-B-16", "openai") == ("open_clip:ViT-B-16@openai", None, True)
    assert embed_spec("ViT-B-16", "hf-hub:org/repo") == ("hf-hub:org/repo", None, True)
    w = tmp_path / "Patho-CLIP-B.pt"
    w.write_bytes(b"")
    assert embed_spec("ViT-B-16", str(w)) == ("open_clip:ViT-B-16", str(w), True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "open_clip_config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"")
    assert embed_spec(str(run)) == (f"pathoclip:{run.resolve()}", None, True)
    with pytest.raises(PathmilError, match="no such weights file"):
        embed_spec("pathoclip-tiny", "missing.safetensors")


def test_result_files_follow_the_schema(trained, colour_store, tmp_path):
    st = colour_store
    zs = zeroshot(trained, st.path, {"blue": ["blue"], "red": ["red"]}, ["{} tissue."], slides=["s3"],
                  labels="red", progress=False, positive="red")
    caps = SimpleNamespace(images=[("tile", "s3", i) for i in range(4)], source=tmp_path / "captions.csv",
                           captions=[(i, "red tissue.") for i in range(4)])
    rt = retrieve(trained, caps, st.path, ks=(1, 5), progress=False)
    x = np.random.default_rng(0).standard_normal((8, 4))
    fs = few_shot(x, np.arange(8) % 2, x, np.arange(8) % 2, shots=(2,), n_subsets=2)
    pr = {"model": {"name": "pathoclip-tiny", "weights": "random-init", "digest": None},
          "data": {"store": st.path, "slides": ("s1",), "n": np.int64(8)},
          "metrics": {**fs, "auc": float("nan"), "n_train": np.float32(0.5)}}
    for task, res in [("zeroshot", zs), ("retrieval", rt), ("probe", pr)]:
        doc = read_result(write_result(tmp_path / "out" / f"{task}.json", task, res))
        assert set(doc) == {"schema", "task", "model", "data", "config", "metrics", "created", "pathmil_version"}
        assert doc["schema"] == SCHEMA == "pathmil.clip.result/1" and doc["task"] == task
        assert "NaN" not in (tmp_path / "out" / f"{task}.json").read_text()
    zdoc = read_result(tmp_path / "out" / "zeroshot.json")
    assert zdoc["model"] == {"name": "pathoclip-tiny", "weights": "random-init", "digest": trained.digest()}
    assert zdoc["data"] == {"store": str(st.path), "slides": ["s3"], "n": 24, "training_slides": {
        "run": None, "excluded": [], "included": []}} and "probs" not in zdoc
    assert zdoc["config"]["classes"] == {"blue": ["blue"], "red": ["red"]} and zdoc["config"]["labels"] == "red"
    assert zdoc["metrics"]["balanced_accuracy"] == pytest.approx(zs["metrics"]["balanced_accuracy"])
    rdoc = read_result(tmp_path / "out" / "retrieval.json")
    assert rdoc["data"]["captions"] == str(tmp_path / "captions.csv") and rdoc["config"] == {"ks": [1, 5]}
    assert rdoc["metrics"]["text_to_image"]["R@5"] == 1.0
    pdoc = read_result(tmp_path / "out" / "probe.json")
    assert pdoc["metrics"]["auc"] is None and pdoc["metrics"]["n_train"] == 0.5 and pdoc["data"]["n"] == 8
    assert pdoc["data"]["slides"] == ["s1"] and pdoc["metrics"]["shots"]["2"] == fs["shots"]["2"]
    with pytest.raises(ValueError, match="task must be"):
        write_result(tmp_path / "x.json", "train", pr)
    (tmp_path / "other.json").write_text('{"schema": "other"}')
    with pytest.raises(PathmilError, match="not a pathmil.clip.result/1 result file"):
        read_result(tmp_path / "other.json")


def test_identical_caption_texts_are_one_text_owned_by_each_image():
    from clip.retrieval import recall_at_k, unique_texts

    pairs = [(0, "tumor"), (1, "Tumor "), (2, "normal tissue")]
    texts, mine = unique_texts(pairs, 3)
    assert texts == ["tumor", "normal tissue"] and mine.tolist() == [[True, False], [True, False], [False, True]]
    sim = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7]])   # image 1 prefers the wrong text
    r = recall_at_k(sim, mine, ks=(1,))
    assert r["image_to_text"]["R@1"] == pytest.approx(2 / 3)
    assert r["text_to_image"]["R@1"] == 0.5   # "tumor" finds image 0 (its own); "normal" finds image 1 (not)
    # without merging, the repeated text would tie with itself and count as a miss for image 0 or 1


def test_tile_embeddings_come_from_the_store_when_it_holds_this_models_features(tmp_path):
    from safetensors.torch import save_file

    from clip.embedding import stored_embeddings
    from wsi.embed import EmbedConfig, embed_store

    torch.manual_seed(0)
    src = load_model("pathoclip-tiny")
    w = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.inner.state_dict().items()}, str(w))
    rng = np.random.default_rng(0)
    store = make_store(tmp_path / "s.zarr", {"a": 5, "b": 3}, tile_size=32,
                       tiles={s: rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("a", 5), ("b", 3))})
    enc = load_model("pathoclip-tiny", pretrained=str(w))
    items = [("b", 2), ("a", 0), ("a", 4)]
    assert stored_embeddings(enc, store.path, items) is None          # nothing stored yet
    fresh = embed_tiles(enc, store.path, items, device="cpu", progress=False)
    embed_store(store.path, EmbedConfig("pathoclip-tiny", weights=str(w), device="cpu"), progress=False)
    got = stored_embeddings(enc, store.path, items)
    np.testing.assert_allclose(got, fresh, atol=1e-5)
    np.testing.assert_allclose(embed_tiles(enc, store.path, items, device="cpu", progress=False), fresh, atol=1e-5)
    other = load_model("pathoclip-tiny")                                # other weights: not reused
    assert stored_embeddings(other, store.path, items) is None
