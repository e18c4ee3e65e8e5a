"""vlm.ask / `vlm ask`: the tiles sent to the model are exactly the slide's highest stored MIL instance
scores (`--run`, predictions written through SlideView.write_predictions), or the tiles most similar to the
question under a PathoCLIP trained here on colour tiles (`--clip`: asking about red picks red tiles); the
montage is written, --json parses, and `vlm` never imports `mil`."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_store
from test_vlm_grounding import trained_colour_clip

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
# slide "a": 12 tiles; two tiles tie at 0.9 (the lower index comes first), "b" is another slide
SCORES = {"a": np.array([0.1, 0.9, 0.3, 0.95, 0.2, 0.9, 0.0, 0.5, 0.85, 0.4, 0.6, 0.7], np.float32),
          "b": np.array([0.99, 0.1, 0.2, 0.3], np.float32)}




@pytest.fixture()
def store(tmp_path):
    preds = {"abmil": {sid: {"instance_score": s, "probs": np.stack([1 - s, s], 1)} for sid, s in SCORES.items()}}
    return make_store(tmp_path / "s.zarr", {"a": 12, "b": 4}, tiles=True, tile_size=32, predictions=preds)


def test_ask_sends_the_tiles_with_the_highest_stored_scores(tiny_vlm, store, tmp_path, capsys):
    from PIL import Image

    from vlm.cli import main

    montage = tmp_path / "out" / "m.png"
    assert main(["-q", "ask", "--store", str(store.path), "--slide", "a", "--question", "Is there tumour?",
                 "--model", str(tiny_vlm), "--run", "abmil", "--top-k", "4", "--json", "--montage", str(montage),
                 "--max-new-tokens", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"answer", "reasoning", "tiles", "montage"} <= set(r)
    coords = store["a"].coords
    assert [t["index"] for t in r["tiles"]] == [3, 1, 5, 8]             # 0.95, 0.9, 0.9 (tie: lower first), 0.85
    assert [t["score"] for t in r["tiles"]] == pytest.approx([0.95, 0.9, 0.9, 0.85])
    assert [(t["x"], t["y"]) for t in r["tiles"]] == [tuple(int(v) for v in coords[i]) for i in (3, 1, 5, 8)]
    assert r["selection"] == {"by": "run", "source": "abmil"} and r["montage"] == str(montage)
    with Image.open(montage) as im:                                     # 4 tiles in one row of 160 px cells
        assert im.format == "PNG" and im.size[0] == 4 * 166 + 6 and im.size[1] > 160
    assert isinstance(r["answer"], str) and isinstance(r["reasoning"], str) and r["completion"]
    # the text output lists the tiles; the default montage lands in the working folder
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["-q", "ask", "--store", str(store.path), "--slide", "b", "--question", "Is there tumour?",
                     "--model", str(tiny_vlm), "--run", "abmil", "--top-k", "2", "--max-new-tokens", "4"]) == 0
    finally:
        os.chdir(cwd)
    text = capsys.readouterr().out
    assert text.startswith("tiles (2, by run abmil):\n  #0 ") and "\n  #3 " in text and "score=0.9900" in text
    assert "answer:" in text and (tmp_path / "ask-b.png").is_file() and "montage: ask-b.png" in text


def test_ask_api_prompt_and_errors(tiny_vlm, store):
    from vlm.ask import ask, select_tiles
    from vlm.model import load_model
    from vlm.prompts import VlmError
    from wsi.errors import StoreError

    model = load_model(tiny_vlm)
    r = ask(store, "a", "Which tissue?", model, run="abmil", top_k=3, options=["normal", "tumor"],
            max_new_tokens=4)
    assert [t["index"] for t in r["tiles"]] == [3, 1, 5] and r["montage"] is None
    assert r["question"] == "Which tissue?" and isinstance(r["well_formed"], bool)
    # k larger than the slide: every tile, best first
    assert [t["index"] for t in select_tiles(store, "b", 10, run="abmil")["tiles"]] == [0, 3, 2, 1]
    with pytest.raises(StoreError, match="has no predictions 'clam'.*mil predict"):
        select_tiles(store, "a", 3, run="clam")
    with pytest.raises(VlmError, match="exactly one of --run NAME"):
        select_tiles(store, "a", 3)
    with pytest.raises(VlmError, match="--top-k 0"):
        select_tiles(store, "a", 0, run="abmil")
    with pytest.raises(StoreError, match="no slide 'zz'"):
        ask(store, "zz", "Which tissue?", model, run="abmil")


def test_ask_without_a_run_picks_tiles_by_pathoclip_similarity(tiny_vlm, tmp_path, capsys):
    from clip.embedding import embed_texts, embed_tiles
    from clip.models import load_model
    from vlm.cli import main

    store, run_dir = trained_colour_clip(tmp_path)
    colour = {(r["slide_id"], int(r["tile"])): r["caption"].split()[3].rstrip(",")
              for r in csv.DictReader(open(tmp_path / "captions.csv"))}
    n_red = sum(1 for (s, _), c in colour.items() if s == "s0" and c == "red")
    assert n_red >= 4
    assert main(["-q", "ask", "--store", str(store), "--slide", "s0", "--question", "a tile stained red",
                 "--model", str(tiny_vlm), "--clip", str(run_dir), "--top-k", "4", "--json", "--montage",
                 str(tmp_path / "m.png"), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    picked = [t["index"] for t in r["tiles"]]
    assert [colour[("s0", i)] for i in picked] == ["red"] * 4 and r["selection"]["by"] == "clip"
    # the scores are the cosine similarities of tile and question, best first
    enc = load_model(str(run_dir))
    img = embed_tiles(enc, store, [("s0", i) for i in picked], device="cpu", progress=False)
    sims = img @ embed_texts(enc, ["a tile stained red"])[0]
    assert [t["score"] for t in r["tiles"]] == pytest.approx(sims.tolist(), abs=1e-5)
    assert sims.tolist() == sorted(sims.tolist(), reverse=True)
    blue = main(["-q", "ask", "--store", str(store), "--slide", "s0", "--question", "a tile stained blue",
                 "--model", str(tiny_vlm), "--clip", str(run_dir), "--top-k", "3", "--json", "--montage",
                 str(tmp_path / "b.png"), "--max-new-tokens", "4", "--device", "cpu"])
    assert blue == 0
    assert [colour[("s0", t["index"])] for t in json.loads(capsys.readouterr().out)["tiles"]] == ["blue"] * 3


def test_vlm_does_not_import_mil():
    code = ("import sys, vlm.ask, vlm.cli, vlm.evaluate, vlm.grounding, vlm.data, vlm.model; "
            "bad = [m for m in sys.modules if m == 'mil' or m.startswith('mil.')]; assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for f in (REPO / "vlm").glob("*.py"):
        src = f.read_text()
        assert "import mil" not in src and "from mil" not in src, f


def test_clip_selection_embeds_a_bounded_chunk_at_a_time_or_uses_stored_features(store, monkeypatch):
    """`--clip` on a slide: the same tiles as ranking every embedding at once, but no embedding call holds
    more than `chunk` tiles; with the model's features in the store, no tile is embedded at all."""
    import clip.embedding as emb
    from clip.models import load_model
    from vlm.ask import select_tiles

    enc = load_model("pathoclip-tiny", random_init=True)
    q = emb.embed_texts(enc, ["tumour cells"])[0]
    everything = emb.embed_tiles(enc, store, [("a", i) for i in range(12)], device="cpu", progress=False) @ q
    expect = np.lexsort((np.arange(12), -everything))[:5].tolist()

    real, sizes = emb.embed_tiles, []

    def counted(enc, store, items, *a, **k):
        sizes.append(len(items))
        return real(enc, store, items, *a, **k)

    monkeypatch.setattr(emb, "embed_tiles", counted)
    sel = select_tiles(store, "a", 5, clip=enc, question="tumour cells", device="cpu", chunk=5)
    assert [t["index"] for t in sel["tiles"]] == expect
    assert [t["score"] for t in sel["tiles"]] == pytest.approx(everything[expect].tolist(), abs=1e-5)
    assert sizes and max(sizes) <= 5 and sum(sizes) == 12
    # stored features of these weights (here: the tiles' embeddings in reverse order) are used as they are
    sizes.clear()
    stored = real(enc, store, [("a", i) for i in range(11, -1, -1)], device="cpu", progress=False)
    store["a"].write_features(enc.spec.name, stored, {"weights_digest": enc.digest()})
    sel = select_tiles(store, "a", 5, clip=enc, question="tumour cells", device="cpu", chunk=5)
    assert sizes == [] and [t["index"] for t in sel["tiles"]] == [11 - i for i in expect]
