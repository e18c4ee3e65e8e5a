"""vlm.data: `vlm data` writes caption / MCQ / SFT JSONL from a store, rows validate per stage, bad lines are
reported by number and skipped, images load from store references and files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clip.captions import TRAIN_SYNONYMS, captions_from_labels
from vlm.data import QUESTION, load_image, load_images, make_data, read_jsonl
from vlm.prompts import LETTERS, VlmError, sft_target

from conftest import fake_tiles, make_store, write_png

SIZES = {"a": 12, "b": 8, "c": 5}


@pytest.fixture()
def built(tmp_path):
    """A store with stored tiles and binary labels on a and b (c unlabelled), its captions CSV, and
    `vlm data` run on them."""
    from vlm.cli import main

    rng = np.random.default_rng(0)
    lab = {"a": rng.random(12).astype(np.float32), "b": rng.random(8).astype(np.float32)}
    lab["a"][:2] = np.nan
    st = make_store(tmp_path / "s.zarr", SIZES, tiles=True, labels={"tumor": lab})
    caps = tmp_path / "caps.csv"
    captions_from_labels(st, "tumor", caps, per_tile=2)
    out = tmp_path / "data"
    assert main(["-q", "data", str(st.path), "--labels", "tumor", "--captions", str(caps), "--out", str(out)]) == 0
    return st, lab, caps, out


def test_vlm_data_writes_three_valid_files_consistent_with_the_labels(built, tmp_path):
    st, lab, caps, out = built
    assert sorted(p.name for p in out.iterdir()) == ["caption.jsonl", "mcq.jsonl", "sft.jsonl"]
    cap = read_jsonl(out / "caption.jsonl", "caption")
    assert len(cap) == 2 * 18 and cap.dropped == []                 # 18 labelled tiles, 2 captions each
    mcq = read_jsonl(out / "mcq.jsonl", "grpo")
    sft = read_jsonl(out / "sft.jsonl", "sft")
    assert len(mcq) == len(sft) == 18 and read_jsonl(out / "mcq.jsonl", "eval").rows == mcq.rows
    phrase_class = {p: c for c, ps in TRAIN_SYNONYMS.items() for p in ps}
    letters = set()
    for row, srow in zip(mcq.rows, sft.rows):
        (ref,) = row["images"]
        assert ref["store"] == str(st.path.resolve()) and row["question"] == QUESTION
        truth = "tumor" if lab[ref["slide"]][ref["tile"]] > 0.5 else "normal"
        assert len(row["options"]) == 2 and {phrase_class[o] for o in row["options"]} == {"normal", "tumor"}
        assert phrase_class[row["options"][LETTERS.index(row["answer"])]] == truth
        letters.add(row["answer"])
        assert {k: v for k, v in srow.items() if k != "reasoning"} == row
        other = LETTERS[1 - LETTERS.index(row["answer"])]
        assert f"option {other} (" in srow["reasoning"] and "ruled out" in srow["reasoning"]
        target = sft_target(srow)
        assert target.startswith("<think>The tile shows ") and target.endswith(
            f"<answer>{row['answer']}. {row['options'][LETTERS.index(row['answer'])]}</answer>")
    assert letters == {"A", "B"}                                    # the right option is not always first
    # captions rows: the CSV's captions of the same tiles
    first = cap.rows[0]
    assert first["images"][0]["slide"] == "a" and isinstance(first["caption"], str) and first["caption"]
    # deterministic for a seed; another seed shuffles differently
    again = make_data(st, "tumor", caps, tmp_path / "again")
    for name in ("caption.jsonl", "mcq.jsonl", "sft.jsonl"):
        assert (tmp_path / "again" / name).read_text() == (out / name).read_text()
    other = make_data(st, "tumor", caps, tmp_path / "other", seed=1, max_per_class=3)
    assert again["rows"]["mcq"] == 18 and other["rows"]["mcq"] == 6
    assert other["per_class"] == {"normal": 3, "tumor": 3} and again["skipped_slides"] == {"c": "no labels 'tumor'"}


def test_images_load_from_store_references_and_files(built, tmp_path):
    st, _, _, out = built
    row = read_jsonl(out / "mcq.jsonl", "grpo").rows[3]
    ref = row["images"][0]
    img = load_image(ref)
    want = st[ref["slide"]].read_tiles([ref["tile"]])[0]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), want)
    write_png(tmp_path / "f.png", fake_tiles("f", 1, 20)[0])
    imgs = load_images([{"store": "s.zarr", "slide": "b", "tile": 7}, "f.png", ref], base=tmp_path)
    assert np.array_equal(np.asarray(imgs[0]), st["b"].read_tiles([7])[0])
    assert np.array_equal(np.asarray(imgs[1]), fake_tiles("f", 1, 20)[0]) and np.array_equal(np.asarray(imgs[2]), want)
    with pytest.raises(VlmError, match="nope.png: cannot read the image"):
        load_image("nope.png", base=tmp_path)


def test_bad_lines_are_reported_by_number_and_skipped(built, tmp_path, caplog):
    st, _, _, _ = built
    write_png(tmp_path / "img.png", fake_tiles("x", 1, 16)[0])
    good = {"images": ["img.png"], "question": "Which?", "options": ["tumor", "normal"], "answer": "B"}
    lines = [json.dumps(good),                                                            # 1 ok (a file)
             "{not json",                                                                  # 2
             json.dumps({**good, "answer": "C"}),                                          # 3 not an option
             "",                                                                           # 4 blank: ignored
             json.dumps({**good, "images": ["missing.png"]}),                              # 5
             json.dumps({**good, "images": [{"store": "s.zarr", "slide": "a", "tile": 99}]}),   # 6 out of range
             json.dumps({**good, "images": [{"store": "s.zarr", "slide": "zz", "tile": 0}]}),   # 7 no slide
             json.dumps({**good, "images": [{"store": "s.zarr", "slide": "b", "tile": 2}], "answer": "normal"}),  # 8 ok
             json.dumps({k: v for k, v in good.items() if k != "question"}),               # 9
             json.dumps([1, 2])]                                                           # 10
    p = tmp_path / "rows.jsonl"
    p.write_text("\n".join(lines) + "\n")
    rows = read_jsonl(p, "grpo")
    assert [r["images"] for r in rows.rows] == [[str(tmp_path / "img.png")],
                                                [{"store": str(st.path.resolve()), "slide": "b", "tile": 2}]]
    assert [n for n, _ in rows.dropped] == [2, 3, 5, 6, 7, 9, 10]
    why = dict(rows.dropped)
    assert why[2].startswith("is not JSON") and "'C' is not one of the letters A-B" in why[3]
    assert why[5] == "image file 'missing.png' not found" and why[6] == "tile 99 out of range (slide 'a' has 12 tiles)"
    assert why[7] == "slide 'zz' is not a complete slide of store 's.zarr'" and why[9] == "has no 'question'"
    assert why[10] == "is not a JSON object"
    assert rows.summary().startswith("2 grpo rows; 7 lines dropped: line 2 is not JSON")
    assert "7 lines dropped" in caplog.text
    # stage rules: an SFT MCQ row needs reasoning; messages rows need a final assistant turn
    sft = tmp_path / "sft.jsonl"
    sft.write_text("\n".join([json.dumps({**good, "reasoning": "crowded nuclei"}), json.dumps(good),
                              json.dumps({"images": [], "messages": [{"role": "user", "content": "hi"}]}),
                              json.dumps({"images": [], "messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "<think>a</think>"
                                                                       "<answer>b</answer>"}]})]))
    s = read_jsonl(sft, "sft")
    assert len(s) == 2 and [n for n, _ in s.dropped] == [2, 3]
    assert "no 'reasoning'" in s.dropped[0][1] and "assistant turn" in s.dropped[1][1]
    cap = tmp_path / "cap.jsonl"
    cap.write_text(json.dumps({"images": [], "caption": "x"}) + "\n" + json.dumps({"images": ["img.png"], "caption": ""}))
    with pytest.raises(VlmError, match=r"cap.jsonl: no valid caption rows \(2 dropped: line 1 has no images; line 2 "
                                       r"has no 'caption'\)"):
        read_jsonl(cap, "caption")
    with pytest.raises(VlmError, match="stage 'ppo': give one of caption, sft, grpo, dapo, eval"):
        read_jsonl(p, "ppo")
    with pytest.raises(VlmError, match="no such JSONL file"):
        read_jsonl(tmp_path / "none.jsonl", "sft")


def test_vlm_data_errors_are_one_line(built, tmp_path, capsys):
    from vlm.cli import main

    st, _, caps, _ = built
    capsys.readouterr()
    assert main(["data", str(st.path), "--labels", "nolabels", "--captions", str(caps), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm: error: ") and "no tile has labels 'nolabels'" in err and "\n" not in err


def test_vlm_data_slides_keep_other_slides_captions_out(built, tmp_path):
    """--slides picks the MCQs' slides and the captions' too: a held-out slide's captions never reach the
    training caption.jsonl."""
    from vlm.cli import main

    st, _, caps, _ = built
    out = tmp_path / "only_a"
    assert main(["-q", "data", str(st.path), "--labels", "tumor", "--captions", str(caps), "--out", str(out),
                 "--slides", "a"]) == 0
    cap = read_jsonl(out / "caption.jsonl", "caption")
    mcq = read_jsonl(out / "mcq.jsonl", "grpo")
    assert {r["images"][0]["slide"] for r in cap.rows} == {"a"} == {r["images"][0]["slide"] for r in mcq.rows}
    assert len(cap) == 2 * 10                                       # a's 10 labelled tiles, 2 captions each
    with pytest.raises(VlmError, match="no caption is of the slides given"):
        make_data(st, "tumor", caps, tmp_path / "none", slides=["c"])
