"""vlm.grounding: the PathoCLIP grounding reward. With a tiny PathoCLIP trained here on flat-colour tiles
whose captions name their colour, reasoning that names a tile's colour earns more than generic text or
the wrong colour, against a fixed bank of tiles of the other colours, whatever the batch; negated
sentences, missing reasoning, PIL images, uint8 arrays and store references behave as documented."""
from __future__ import annotations

import math

import numpy as np
import pytest

from test_clip_train import COLOURS, FAST, colour_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_colour_clip(root):
    """(store path, RUN_DIR) of a pathoclip-tiny trained on the colour cohort (about 9 s on one thread)."""
    from clip.config import ClipTrainConfig
    from clip.train import train_clip

    store, caps = colour_cohort(root)
    train_clip(ClipTrainConfig(**{**FAST, "epochs": 8}), caps, root / "run", store=store, progress=False)
    return store, root / "run"


@pytest.fixture(scope="module")
def colour_clip(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trained_colour_clip(tmp_path_factory.mktemp("colour"))
    finally:
        torch.set_num_threads(n)


COLOUR_OPTIONS = ["red", "blue", "green"]


def flat(colour: str, seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(COLOURS[colour], float) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)


def letter(colour: str) -> str:
    return "ABC"[COLOUR_OPTIONS.index(colour)]


# training rows: four tiles of each colour (seeds 100+), an MCQ each; the bank draws from these
ROWS = [{"images": [flat(c, 100 + 10 * k + i)], "question": "Which colour?", "options": COLOUR_OPTIONS,
         "answer": letter(c)} for k, c in enumerate(COLOUR_OPTIONS) for i in range(4)]


@pytest.fixture(scope="module")
def reward(colour_clip):
    from vlm.grounding import make_grounding_reward

    return make_grounding_reward(colour_clip[1], rows=ROWS, per_class=3, device="cpu")


def says(text: str) -> str:
    return f"<think>{text}</think><answer>A</answer>"


def score(reward, completions, colours, images):
    n = len(completions)
    return reward(completions, images=images, answer=[letter(c) for c in colours], options=[COLOUR_OPTIONS] * n)


def test_reward_does_not_depend_on_batch_mates(reward):
    # the same completion about the same red tile, batched alone (a group of 2), with a blue tile's prompt,
    # and with another red tile's prompt: in-batch negatives gave 0.5, ~1 and ~0.5; the bank gives one value
    red, red2, blue = flat("red"), flat("red", 7), flat("blue", 1)
    mine = says("A tile stained red.")
    alone = score(reward, [mine, mine], ["red"] * 2, [red, red])[0]
    with_blue = score(reward, [mine, mine, says("A tile stained blue.")], ["red", "red", "blue"], [red, red, blue])[0]
    with_red = score(reward, [mine, says("A tile stained red.")], ["red", "red"], [red, red2])[0]
    assert alone == pytest.approx(with_blue, abs=1e-5) and alone == pytest.approx(with_red, abs=1e-5)
    assert alone > 0.9                                   # the tile's own colour: well above the neutral 0.5


def test_bank_is_fixed_seeded_and_of_other_classes(reward, colour_clip):
    from vlm.grounding import NegativeBank, class_key

    bank = reward.bank
    assert bank.classes == ["blue", "green", "red"] and all(len(bank.rows[c]) == 3 for c in bank.classes)
    assert all(class_key(ROWS[i]["answer"], COLOUR_OPTIONS) == c for c in bank.classes for i in bank.rows[c])
    again = NegativeBank(reward.encoder, ROWS, per_class=3, seed=0)
    assert again.rows == bank.rows
    assert NegativeBank(reward.encoder, ROWS, per_class=3, seed=1).rows != bank.rows
    # synonyms of one class are one class; an open question's class is its answer
    assert class_key("B", ["benign tissue", "carcinoma"]) == "tumor" == class_key("A", ["tumor", "normal"])
    assert class_key("Adenocarcinoma.", None) == "adenocarcinoma"
    from vlm.prompts import VlmError

    with pytest.raises(VlmError, match="at least two answers"):
        NegativeBank(reward.encoder, ROWS[:4], per_class=3)


def test_reasoning_naming_the_right_colour_scores_highest(reward):
    from PIL import Image

    red, blue, green = flat("red"), flat("blue", 1), flat("green", 2)
    generic = says("I will answer the question step by step.")
    # a GRPO batch: three prompts (a red, a blue, a green tile), three completions each: the tile's colour,
    # generic text, another tile's colour; images as lists of arrays, PIL images and bare arrays
    completions = [says("A tile stained red."), generic, says("A tile stained green."),
                   says("A tile stained blue."), generic, says("A tile stained red."),
                   says("A tile stained green."), generic, says("A tile stained blue.")]
    colours = ["red"] * 3 + ["blue"] * 3 + ["green"] * 3
    images = [[red]] * 3 + [[Image.fromarray(blue)]] * 3 + [green] * 3
    r = np.array(score(reward, completions, colours, images))
    assert r.shape == (9,) and ((0.0 <= r) & (r <= 1.0)).all()
    right, plain, wrong = r[0::3], r[1::3], r[2::3]
    assert (right > 0.9).all() and (wrong < 0.1).all()                  # own colour near 1, another's near 0
    # generic text points somewhere arbitrary in a tiny CLIP's space: it may win on one tile, not on average
    assert right.mean() > plain.mean() + 0.3 and (right > plain).sum() >= 2
    assert (right > wrong + 0.8).all()
    # each prompt alone (no batch-mates), as PIL images or uint8 arrays: the same rewards
    for k, (c, im) in enumerate(zip(COLOUR_OPTIONS, [Image.fromarray(red), blue, [Image.fromarray(green)]])):
        assert score(reward, [completions[3 * k]], [c], [im]) == pytest.approx([right[k]], abs=1e-5)


def test_margin_sigmoid_and_reductions(reward):
    from clip.embedding import embed_texts
    from vlm.grounding import _image_vectors, grounding_scores

    enc, bank = reward.encoder, reward.bank
    tiles = [flat("red"), flat("blue", 1), flat("green", 2)]
    text = "A tile stained blue."
    kw = dict(bank=bank, answer=["A", "B", "C"], options=[COLOUR_OPTIONS] * 3)
    out = grounding_scores(enc, [says(text)] * 3, tiles, **kw)                  # default: max of class means
    own, t = _image_vectors(enc, tiles) @ embed_texts(enc, [text])[0], embed_texts(enc, [text])[0]
    means = {c: float((bank.vectors[c] @ t).mean()) for c in bank.classes}
    for k, c in enumerate(COLOUR_OPTIONS):
        margin = own[k] - max(m for cc, m in means.items() if cc != c)
        assert out[k]["margin"] == pytest.approx(margin, abs=1e-5)
        assert out[k]["reward"] == pytest.approx(1 / (1 + math.exp(-float(enc.logit_scale) * margin)), abs=1e-5)
    assert out[1]["reward"] > 0.9 and out[0]["reward"] < 0.1 and out[2]["reward"] < 0.1
    mean = grounding_scores(enc, [says(text)] * 3, tiles, **kw, reduce="mean", scale=1.0)
    for k, c in enumerate(COLOUR_OPTIONS):
        margin = own[k] - np.concatenate([bank.vectors[cc] @ t for cc in bank.classes if cc != c]).mean()
        assert mean[k]["margin"] == pytest.approx(margin, abs=1e-5)
        assert mean[k]["reward"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-5)


def test_no_reasoning_negations_and_a_class_without_others(reward):
    red, blue = flat("red"), flat("blue", 1)
    cases = ["<answer>A</answer>", "<think>  </think><answer>A</answer>", "A tile stained red.",
             says("No blue staining. Blue is ruled out."), says("A tile stained red. There is no blue here.")]
    r = score(reward, cases, ["red"] * 4 + ["blue"], [red, red, red, red, blue])
    assert r[:4] == [0.0, 0.0, 0.0, 0.0]             # no / empty / untagged reasoning; only negated sentences
    # the negated sentence is dropped: "no blue" on the blue tile is scored as "a tile stained red"
    assert r[4] < 0.1
    from vlm.grounding import findings

    assert findings("The tile is red. No blue, so option B is ruled out.\nIt isn't green; dense cells.") == [
        "The tile is red.", "dense cells."]
    # a class the bank holds no other class for: the neutral 0.5 (only "red" and "blue" rows here)
    from vlm.grounding import grounding_scores

    two = [{**row, "options": ["red", "blue"]} for row in ROWS if row["answer"] in "AB"]
    from vlm.grounding import NegativeBank

    bank = NegativeBank(reward.encoder, two, per_class=2)
    bank.classes = ["red"]                            # as if the run's rows held one class only
    out = grounding_scores(reward.encoder, [says("A tile stained red.")], [red], bank=bank, answer=["A"],
                           options=[["red", "blue"]])
    assert out[0]["reward"] == 0.5 and out[0]["margin"] is None


def test_store_references_and_bad_inputs(reward, colour_clip):
    from vlm.grounding import make_grounding_reward
    from vlm.prompts import VlmError
    from wsi.store import TileStore

    store = str(colour_clip[0])
    view = TileStore.open(store, readonly=True)["s0"]
    tiles = view.read_tiles([0, 1])
    refs = [{"store": store, "slide": "s0", "tile": 0}, {"store": store, "slide": "s0", "tile": 1}]
    comps = [says("A tile stained red."), says("A tile stained blue.")]
    assert score(reward, comps, ["red", "blue"], refs) == pytest.approx(score(reward, comps, ["red", "blue"],
                                                                              list(tiles)), abs=1e-5)
    with pytest.raises(VlmError, match="got 2 completions but 1 image entries"):
        score(reward, comps, ["red", "blue"], [tiles[0]])
    with pytest.raises(VlmError, match="dtype float64"):
        score(reward, comps, ["red", "blue"], [tiles[0] / 255.0, tiles[1]])
    with pytest.raises(VlmError, match="needs the dataset's 'answer' column"):
        reward(comps, images=list(tiles))
    with pytest.raises(VlmError, match="reduce 'median'"):
        make_grounding_reward(reward.encoder, rows=ROWS, reduce="median")
    # the bank can be made of store references (as `vlm data` rows are)
    ref_rows = [{"images": [r], "answer": a, "options": COLOUR_OPTIONS} for r, a in zip(refs, "AB")]
    assert sum(len(v) for v in make_grounding_reward(reward.encoder, rows=ref_rows).bank.rows.values()) == 2
