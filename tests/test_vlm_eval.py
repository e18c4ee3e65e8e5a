"""vlm.evaluate / `vlm eval`: scoring fixed completions counts right (accuracy, format rate, mean reward,
per-item fields), and the tiny model answers an mcq.jsonl made by `vlm data` from a store in batches,
writing RESULT.json whose per-item records agree with the rewards and the metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS = [{"question": "Which tissue?", "options": ["normal tissue", "tumor"], "answer": "B"},
        {"question": "Which tissue?", "options": ["tumor", "benign tissue"], "answer": "tumor"},
        {"question": "Which tissue?", "options": ["normal", "carcinoma", "stroma"], "answer": "C"},
        {"question": "Which tissue?", "options": ["normal", "tumor"], "answer": "A"},
        {"question": "Which tissue?", "options": ["normal", "tumor"], "answer": "A"},
        {"question": "Which tissue?", "options": ["normal", "tumor"], "answer": "B"},
        {"question": "What is the diagnosis?", "answer": "invasive ductal carcinoma"},
        {"question": "What is the diagnosis?", "answer": "invasive ductal carcinoma"}]
COMPLETIONS = ["<think>crowded nuclei</think><answer>B. tumor</answer>",      # right letter and text
               "<think>crowded nuclei</think><answer>A</answer>",             # right letter ("tumor" is A)
               "<think>pink</think><answer>C. carcinoma</answer>",            # right letter, wrong text
               "<answer>A</answer>",                                           # right, but no <think>
               "<think>x</think><answer>B</answer>",                           # wrong letter
               "<think>x</think><answer>B</answer><answer>B</answer>",         # repeated answers (open-r1 #418)
               "<think>ductal</think><answer>Invasive ductal carcinoma.</answer>",   # open: exact after normalising
               "<think>ductal</think><answer>ductal carcinoma</answer>"]      # open: token F1 0.8


def test_scoring_fixed_completions_counts_right():
    from vlm.evaluate import score_completions, summarize

    items = score_completions(COMPLETIONS, ROWS)
    assert [i["correct"] for i in items] == [True, True, False, True, False, False, True, False]
    assert [i["format_ok"] for i in items] == [True, True, True, False, True, False, True, True]
    assert [i["pred_letter"] for i in items] == ["B", "A", "C", "A", "B", None, None, None]
    assert items[7]["accuracy_score"] == pytest.approx(0.8)
    assert items[3]["format_reason"] == "no <think>...</think> block" and items[5]["pred_answer"] is None
    want = [0.1 + 0.9, 0.1 + 0.9, 0.1, 0.9, 0.1, 0.0, 1.0, 0.1 + 0.9 * 0.8]
    assert [i["reward"] for i in items] == pytest.approx(want)
    assert items[0]["answer"] == "B" and items[0]["response"] == COMPLETIONS[0] and items[6]["options"] is None
    m = summarize(items)
    assert m["n"] == 8 and m["accuracy"] == pytest.approx(4 / 8) and m["format_rate"] == pytest.approx(6 / 8)
    assert m["mean_reward"] == pytest.approx(sum(want) / 8)
    assert m["mean_accuracy_score"] == pytest.approx((4 + 0.8) / 8)
    # other weights: accuracy only; a pre-filled <think> template (trl #6966): the completion starts inside
    only_acc = score_completions(COMPLETIONS, ROWS, weights=(0.0, 1.0))
    assert [i["reward"] for i in only_acc] == pytest.approx([i["accuracy_score"] for i in items])
    pre = score_completions(["crowded nuclei</think><answer>B</answer>"], ROWS[:1], prefilled_think=True)
    assert pre[0]["format_ok"] and pre[0]["correct"] and pre[0]["reward"] == pytest.approx(1.0)
    from vlm.prompts import VlmError

    with pytest.raises(VlmError, match="2 completions for 1 rows"):
        score_completions(COMPLETIONS[:2], ROWS[:1])




@pytest.fixture()
def mcq(tmp_path):
    """mcq.jsonl made by `vlm data` from a store of 10 labelled tiles, plus one bad line."""
    from clip.captions import captions_from_labels
    from vlm.data import make_data

    lab = {"a": np.array([0, 1, 0, 1, 1, 0], np.float32), "b": np.array([1, 0, 0, 1], np.float32)}
    st = make_store(tmp_path / "s.zarr", {"a": 6, "b": 4}, tiles=True, labels={"tumor": lab})
    captions_from_labels(st, "tumor", tmp_path / "caps.csv")
    s = make_data(st, "tumor", tmp_path / "caps.csv", tmp_path / "data")
    path = tmp_path / "data" / "mcq.jsonl"
    with open(path, "a") as f:
        f.write('{"question": "no answer"}\n')
    return path, s


def test_vlm_eval_answers_the_mcq_file_in_batches(tiny_vlm, mcq, tmp_path, capsys):
    from vlm.cli import main
    from vlm.evaluate import evaluate
    from vlm.model import load_model
    from vlm.rewards import accuracy_reward, format_reward

    path, made = mcq
    out = tmp_path / "res" / "RESULT.json"
    assert main(["-q", "eval", "--model", str(tiny_vlm), "--data", str(path), "--out", str(out), "--batch-size", "4",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == {"model", "data", "config", "metrics", "items", "created"}
    assert res["data"]["n"] == made["rows"]["mcq"] == 10 and res["data"]["dropped_lines"][0][0] == 11
    assert res["config"]["batch_size"] == 4 and res["config"]["reward_weights"] == [0.1, 0.9]
    assert res["config"]["prefilled_think"] is False                  # the real Qwen2.5-VL template
    items = res["items"]
    rows = [json.loads(line) for line in path.read_text().splitlines()[:10]]
    assert len(items) == 10 and [i["id"] for i in items] == list(range(10))
    keys = {"id", "question", "options", "answer", "response", "pred_answer", "pred_letter", "correct",
            "accuracy_score", "format_ok", "format_reason", "reward", "images"}
    for item, row in zip(items, rows):
        assert set(item) == keys
        assert item["answer"] == row["answer"] and item["options"] == row["options"]
        assert item["images"][0]["tile"] == row["images"][0]["tile"]
        assert isinstance(item["response"], str) and item["response"].strip()
    responses = [i["response"] for i in items]
    acc = accuracy_reward(responses, [r["answer"] for r in rows], [r["options"] for r in rows])
    fmt = format_reward(responses)
    assert [i["correct"] for i in items] == [a == 1.0 for a in acc]
    assert [i["format_ok"] for i in items] == [f == 1.0 for f in fmt]
    m = res["metrics"]
    assert m["n"] == 10 and m["accuracy"] == pytest.approx(np.mean([a == 1.0 for a in acc]))
    assert m["format_rate"] == pytest.approx(np.mean(fmt))
    assert m["mean_reward"] == pytest.approx(np.mean([0.1 * f + 0.9 * a for f, a in zip(fmt, acc)]))
    assert f"10 questions: accuracy {m['accuracy']:.3f}, format rate {m['format_rate']:.3f}" in printed
    # batching does not change greedy answers (left padding): one prompt at a time gives the same responses
    model = load_model(tiny_vlm)
    one = evaluate(model, path, batch_size=1, max_new_tokens=6, limit=4, progress=False)
    assert [i["response"] for i in one["items"]] == responses[:4] and one["data"]["n"] == 4


def test_vlm_eval_errors_are_one_line(tiny_vlm, tmp_path, capsys):
    from vlm.cli import main

    assert main(["eval", "--model", str(tiny_vlm), "--data", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.jsonl: no such JSONL file" in err and "\n" not in err
    assert main(["eval", "--model", str(tiny_vlm), "--data", str(tmp_path / "none.jsonl"), "--out",
                 str(tmp_path / "r.json"), "--batch-size", "0"]) == 2
    assert "--batch-size 0: give a number >= 1" in capsys.readouterr().err


def test_vlm_eval_generates_as_long_as_the_model_was_trained_to(tiny_vlm, mcq, tmp_path):
    """No --max-new-tokens: the model folder's GRPO completion length (the tiny folder's defaults: 64; a
    grpo/dapo RUN_DIR's own, test_vlm_train), not a fixed 256 that cuts a 1,024-token reasoning short; the
    defaults for real checkpoints otherwise."""
    from vlm.cli import main
    from vlm.train import DEFAULTS

    path, _ = mcq
    out = tmp_path / "r.json"
    assert main(["-q", "eval", "--model", str(tiny_vlm), "--data", str(path), "--out", str(out), "--limit", "2"]) == 0
    cfg = json.loads(out.read_text())["config"]
    assert cfg["max_new_tokens"] == 64 and cfg["reward_weights"] == [0.1, 0.9]
    assert cfg["run_settings_from"] == "the grpo defaults of the model folder"
    from vlm.evaluate import run_generation

    hub = run_generation("Qwen/Qwen2.5-VL-3B-Instruct")
    assert hub["max_new_tokens"] == DEFAULTS["grpo"]["max_completion_length"] == 1024


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_vlm_eval_on_a_gpu_that_is_not_there_is_one_line(tiny_vlm, mcq, tmp_path, capsys):
    from vlm.cli import main

    path, _ = mcq
    assert main(["eval", "--model", str(tiny_vlm), "--data", str(path), "--out", str(tmp_path / "r.json"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "vlm: error: device 'cuda:0' asked for, but torch sees no CUDA GPU; use --device cpu"
