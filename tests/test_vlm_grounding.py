"""vlm.grounding: the PathoCLIP grounding reward. With a tiny PathoCLIP trained here on flat-colour tiles
whose captions name their colour, reasoning that names a tile's colour earns more than generic text or
the wrong colour; negated sentences, missing reasoning, a batch without other images, PIL images, uint8
arrays and store references behave as documented."""
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


@pytest.fixture(scope="module")
def reward(colour_clip):
    from vlm.grounding import make_grounding_reward

    return make_grounding_reward(colour_clip[1], device="cpu")


def flat(colour: str, seed: int = 0, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(COLOURS[colour], float) + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)


def says(text: str) -> str:
    return f"<think>{text}</think><answer>A</answer>"


def test_reasoning_naming_the_right_colour_scores_highest(reward):
    from PIL import Image

    red, blue, green = flat("red"), flat("blue", 1), flat("green", 2)
    generic = says("I will answer the question step by step.")
    # a GRPO batch: three prompts (a red, a blue, a green tile), three completions each: the tile's colour,
    # generic text, another tile's colour; images as lists of arrays, PIL images and bare arrays
    completions = [says("A tile stained red."), generic, says("A tile stained green."),
                   says("A tile stained blue."), generic, says("A tile stained red."),
                   says("A tile stained green."), generic, says("A tile stained blue.")]
    images = [[red]] * 3 + [[Image.fromarray(blue)]] * 3 + [green] * 3
    r = np.array(reward(completions, images=images, answer=["A"] * 9))
    assert r.shape == (9,) and ((0.0 <= r) & (r <= 1.0)).all()
    right, plain, wrong = r[0::3], r[1::3], r[2::3]
    assert (right > 0.9).all() and (wrong < 0.1).all()                  # own colour near 1, another's near 0
    # generic text points somewhere arbitrary in a tiny CLIP's space: it may win on one tile, not on average
    assert right.mean() > plain.mean() + 0.3 and (right > plain).sum() >= 2
    assert (right > wrong + 0.8).all()
    # the same batch of tiles as PIL images or uint8 arrays scores the same
    again = reward(completions[0::3], images=[Image.fromarray(red), blue, [Image.fromarray(green)]])
    assert again == pytest.approx(right, abs=1e-5)


def test_margin_sigmoid_and_reductions(colour_clip):
    from clip.embedding import embed_texts
    from vlm.grounding import _image_vectors, grounding_scores, make_grounding_reward

    enc = make_grounding_reward(colour_clip[1], device="cpu").encoder
    tiles = [flat("red"), flat("blue", 1), flat("green", 2)]
    text = "A tile stained blue."
    out = grounding_scores(enc, [says(text)] * 3, tiles)                # default: the max over the others
    img, t = _image_vectors(enc, tiles), embed_texts(enc, [text])[0]
    sims = img @ t
    for k in range(3):
        margin = sims[k] - np.delete(sims, k).max()
        assert out[k]["margin"] == pytest.approx(margin, abs=1e-5)
        assert out[k]["reward"] == pytest.approx(1 / (1 + math.exp(-float(enc.logit_scale) * margin)), abs=1e-5)
    assert out[1]["reward"] > 0.9 and out[0]["reward"] < 0.1 and out[2]["reward"] < 0.1
    mean = grounding_scores(enc, [says(text)] * 3, tiles, reduce="mean", scale=1.0)
    for k in range(3):
        margin = sims[k] - np.delete(sims, k).mean()
        assert mean[k]["margin"] == pytest.approx(margin, abs=1e-5)
        assert mean[k]["reward"] == pytest.approx(1 / (1 + math.exp(-margin)), abs=1e-5)


def test_no_reasoning_negations_and_a_batch_of_one_image(reward):
    red, blue = flat("red"), flat("blue", 1)
    cases = ["<answer>A</answer>", "<think>  </think><answer>A</answer>", "A tile stained red.",
             says("No blue staining. Blue is ruled out."), says("A tile stained red. There is no blue here.")]
    r = reward(cases, images=[red, red, red, red, blue])
    assert r[:4] == [0.0, 0.0, 0.0, 0.0]             # no / empty / untagged reasoning; only negated sentences
    # the negated sentence is dropped: "no blue" on the blue tile is scored as "a tile stained red"
    assert r[4] < 0.1
    from vlm.grounding import findings

    assert findings("The tile is red. No blue, so option B is ruled out.\nIt isn't green; dense cells.") == [
        "The tile is red.", "dense cells."]
    # every completion about the same image: no contrast, the neutral 0.5 (0 without reasoning)
    assert reward([says("A tile stained red."), says("A tile stained blue."), "no tags"], images=[red] * 3) == [
        0.5, 0.5, 0.0]


def test_store_references_and_bad_inputs(reward, colour_clip):
    from vlm.grounding import make_grounding_reward
    from vlm.prompts import VlmError
    from wsi.store import TileStore

    store = str(colour_clip[0])
    view = TileStore.open(store, readonly=True)["s0"]
    tiles = view.read_tiles([0, 1])
    refs = [{"store": store, "slide": "s0", "tile": 0}, {"store": store, "slide": "s0", "tile": 1}]
    comps = [says("A tile stained red."), says("A tile stained blue.")]
    assert reward(comps, images=refs) == pytest.approx(reward(comps, images=list(tiles)), abs=1e-5)
    with pytest.raises(VlmError, match="got 2 completions but 1 image entries"):
        reward(comps, images=[tiles[0]])
    with pytest.raises(VlmError, match="dtype float64"):
        reward(comps, images=[tiles[0] / 255.0, tiles[1]])
    with pytest.raises(VlmError, match="reduce 'median'"):
        make_grounding_reward(reward.encoder, reduce="median")
