"""vlm.train / `vlm train` on the tiny Qwen2.5-VL and a toy MCQ whose answer depends only on the image (red
tiles: tumor, blue tiles: normal, fixed options): assistant-only SFT with the model folder's own defaults
learns it (held-out greedy accuracy and format rate), GRPO and DAPO run from the SFT output and log their
rewards, runs resume from their checkpoints, and DAPO's dynamic-sampling filter on constructed groups."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(d, n_train: int = 48, n_test: int = 16, seed: int = 0):
    from vlm.data import FINDINGS

    rng = np.random.default_rng(seed)
    n = n_train + n_test
    cls = np.arange(n) % 2                                   # 1: tumor (red), 0: normal (blue)
    tiles = rng.integers(0, 80, (n, 56, 56, 3)).astype(np.uint8)
    tiles[cls == 1, :, :, 0] += 170
    tiles[cls == 0, :, :, 2] += 170
    make_store(d / "s.zarr", {"a": n}, tiles={"a": tiles}, tile_size=56)
    opts, rows = ["normal", "tumor"], []
    for i in range(n):
        t, o = int(cls[i]), 1 - int(cls[i])
        rows.append({"images": [{"store": "s.zarr", "slide": "a", "tile": i}], "options": opts, "answer": "AB"[t],
                     "question": "Which tissue does this tile show?",
                     "reasoning": f"The tile shows {FINDINGS[opts[t]]}. No {FINDINGS[opts[o]]}, so option "
                                  f"{'AB'[o]} is ruled out."})
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]) + "not json\n")
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The toy data, the tiny model, and plain `vlm train --stage sft` (no learning-rate or batch flags)."""
    import time

    from vlm.cli import main
    from vlm.tiny import make_tiny

    d = tmp_path_factory.mktemp("vlmtrain")
    _toy(d)
    make_tiny(d / "tiny")
    t0 = time.perf_counter()
    assert main(["-q", "train", "--stage", "sft", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"),
                 "--out", str(d / "sft"), "--max-steps", "100"]) == 0
    return d, time.perf_counter() - t0


def test_sft_learns_the_toy_task_with_the_folders_defaults(sft_run, capsys):
    from vlm.evaluate import evaluate
    from vlm.model import load_model

    d, seconds = sft_run
    s = json.loads((d / "sft" / "train_summary.json").read_text())
    assert s["settings"]["lr"] == 3e-3 and s["settings"]["batch_size"] == 8    # from pathmil_defaults.json
    assert s["rows"] == 48 and s["dropped_lines"][0][0] == 49 and s["steps"] == 100
    assert s["device"]["device"] == "cpu" and s["device"]["bf16"] is False
    assert s["device"]["gradient_checkpointing"] is False
    losses = [e["loss"] for e in s["log"] if "loss" in e]
    assert len(losses) == 100 and np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
    # a plain model folder: safetensors only, the processor, the tiny defaults carried on to the next stage
    names = {p.name for p in (d / "sft").iterdir()}
    assert {"config.json", "model.safetensors", "pathmil_defaults.json", "chat_template.jinja"} <= names
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in (d / "sft").iterdir())
    net, proc = load_model(d / "sft")
    before = evaluate(d / "tiny", d / "test.jsonl", max_new_tokens=64, batch_size=16, progress=False)["metrics"]
    after = evaluate((net, proc), d / "test.jsonl", max_new_tokens=64, batch_size=16, progress=False)["metrics"]
    print(f"sft: {seconds:.1f} s; held-out accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
          f"format rate {before['format_rate']:.2f} -> {after['format_rate']:.2f}")
    assert before["accuracy"] < 0.9 and before["format_rate"] == 0.0
    assert after["accuracy"] >= 0.9 and after["format_rate"] >= 0.9



def _sampled_rows(d, copies: int = 8) -> list[dict]:
    """The held-out questions, each `copies` times, store paths made absolute (rows passed to evaluate)."""
    from vlm.data import read_jsonl

    return [dict(r, images=[dict(im, store=str(d / im["store"])) for im in r["images"]])
            for r in read_jsonl(d / "test.jsonl", "eval").rows] * copies


def test_sft_then_grpo_learns_and_grpo_raises_the_reward_from_a_weak_start(tmp_path):
    """The learning proof: a short SFT (a weak start: right when greedy, often malformed or wrong when sampled),
    then >= 120 GRPO steps with the folder's defaults (lr 3e-4, 4 generations, beta 0): the training reward's
    last quarter beats its first by >= 0.1, the held-out reward sampled at temperature 1 rises, and held-out
    greedy accuracy >= 0.9 with format rate >= 0.95 (the untrained model: no format, no right answer).
    Measured over seeds 0-2 (240 steps, ~40 s): last-minus-first quarter +0.23 to +0.32, held-out sampled
    reward 0.41 -> 0.70-0.80 (greedy 1.0 and format 1.0 after SFT and after GRPO)."""
    from vlm.evaluate import evaluate
    from vlm.tiny import make_tiny
    from vlm.train import train

    d = tmp_path
    _toy(d)
    make_tiny(d / "tiny")
    held_out = _sampled_rows(d)

    def metrics(model: str) -> tuple[dict, dict]:
        greedy = evaluate(d / model, d / "test.jsonl", max_new_tokens=64, batch_size=16, progress=False)["metrics"]
        sampled = evaluate(d / model, held_out, max_new_tokens=64, batch_size=16, temperature=1.0, seed=0,
                           progress=False)["metrics"]
        return greedy, sampled

    untrained, _ = metrics("tiny")
    train("sft", d / "train.jsonl", d / "tiny", d / "sft", max_steps=60, progress=False)
    sft_greedy, sft_sampled = metrics("sft")
    s = train("grpo", d / "train.jsonl", d / "sft", d / "grpo", max_steps=240, save_steps=1000, progress=False)
    grpo_greedy, grpo_sampled = metrics("grpo")
    r = np.array([e["reward"] for e in s["log"] if "reward" in e])
    q = len(r) // 4
    print(f"reward first quarter {r[:q].mean():.3f} -> last {r[-q:].mean():.3f}; held-out sampled reward "
          f"{sft_sampled['mean_reward']:.3f} -> {grpo_sampled['mean_reward']:.3f}; greedy accuracy "
          f"{untrained['accuracy']:.2f} -> {sft_greedy['accuracy']:.2f} -> {grpo_greedy['accuracy']:.2f}, format "
          f"{untrained['format_rate']:.2f} -> {grpo_greedy['format_rate']:.2f} ({s['seconds']:.0f} s of GRPO)")
    assert len(r) == 240 and s["settings"]["lr"] == 3e-4 and s["settings"]["beta"] == 0.0
    assert untrained["accuracy"] < 0.6 and untrained["format_rate"] == 0.0
    assert sft_sampled["mean_reward"] < 0.7                          # a weak start when sampled
    assert r[-q:].mean() - r[:q].mean() >= 0.1
    assert grpo_sampled["mean_reward"] >= sft_sampled["mean_reward"] + 0.1
    assert grpo_greedy["accuracy"] >= 0.9 and grpo_greedy["format_rate"] >= 0.95


def test_grpo_from_sft_logs_rewards_and_resumes(sft_run, capsys):
    from vlm.cli import main
    from vlm.model import load_model

    d, _ = sft_run
    args = ["-q", "train", "--stage", "grpo", "--data", str(d / "train.jsonl"), "--model", str(d / "sft"), "--out",
            str(d / "grpo"), "--save-steps", "2"]
    assert main([*args, "--max-steps", "2"]) == 0
    assert "grpo: 2 steps" in capsys.readouterr().out
    assert (d / "grpo" / "checkpoints" / "checkpoint-2").is_dir()
    assert main([*args, "--max-steps", "3"]) == 0                    # resumes from checkpoint-2
    s = json.loads((d / "grpo" / "train_summary.json").read_text())
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 3
    assert s["settings"]["num_generations"] == 4 and s["settings"]["reward_weights"] == [0.1, 0.9]
    steps = [e for e in s["log"] if "reward" in e]
    assert len(steps) == 3                                           # steps 1-2 restored from the checkpoint
    e = steps[-1]
    assert 0.0 <= e["rewards/format_reward/mean"] <= 1.0 and 0.0 <= e["rewards/accuracy_reward/mean"] <= 1.0
    assert e["reward"] == pytest.approx(0.1 * e["rewards/format_reward/mean"] + 0.9 * e["rewards/accuracy_reward/mean"])
    assert "dynamic_sampling/dropped_groups" not in e
    load_model(d / "grpo")


def test_dapo_drops_zero_variance_groups_and_logs_them(sft_run):
    from vlm.train import train

    d, _ = sft_run
    s = train("dapo", d / "train.jsonl", d / "sft", d / "dapo", max_steps=3, max_tries=3, progress=False)
    steps = [e for e in s["log"] if "reward" in e]
    assert len(steps) == 3
    for e in steps:
        assert "rewards/soft_overlong_punishment_reward/mean" in e
        assert 1 <= e["dynamic_sampling/tries"] <= 3 and e["dynamic_sampling/dropped_groups"] >= 0
        assert 0 <= e["dynamic_sampling/filled_groups"] <= 2
        if e["dynamic_sampling/dropped_groups"] == 0:
            assert e["dynamic_sampling/tries"] == 1
    assert s["settings"]["beta"] == 0.0


def test_dynamic_sampling_filter_on_constructed_groups():
    from vlm.dynamic import concat_batches, informative_groups, select_rows
    from vlm.prompts import VlmError

    rewards = [1.0, 1.0, 1.0, 1.0,  0.0, 0.0, 0.0, 0.0,  0.1, 1.0, 1.0, 0.1,  0.5, float("nan"), 0.5, 0.5,
               1.0, float("nan"), float("nan"), float("nan"),  0.0, 0.0, 0.0, 1e-3]
    assert informative_groups(rewards, 4).tolist() == [False, False, True, False, False, True]
    with pytest.raises(VlmError, match="do not split into groups of 4"):
        informative_groups(rewards[:6], 4)

    def batch(P: int, C: int, base: int):
        B = 4
        return {"prompt_ids": torch.full((B, P), base), "prompt_mask": torch.ones(B, P, dtype=torch.long),
                "completion_ids": torch.full((B, C), base + 1), "completion_mask": torch.ones(B, C, dtype=torch.long),
                "old_per_token_logps": torch.full((B, C), -1.0), "advantages": torch.arange(B, dtype=torch.float) + base,
                "mm_token_type_ids": torch.cat([torch.ones(B, P, dtype=torch.long), torch.zeros(B, C, dtype=torch.long)], 1),
                "num_images": [1] * B, "pixel_values": [torch.full((4, 3), float(base + i)) for i in range(B)],
                "num_items_in_batch": torch.tensor(B * C)}

    a, b = batch(P=3, C=2, base=10), batch(P=5, C=4, base=20)
    out = concat_batches([select_rows(a, [2, 3]), select_rows(b, [0, 1])], pad_token_id=0)
    assert out["prompt_ids"].tolist()[0] == [0, 0, 10, 10, 10] and out["prompt_ids"].tolist()[3] == [20] * 5
    assert out["prompt_mask"].tolist()[0] == [0, 0, 1, 1, 1]
    assert out["completion_ids"].tolist()[1] == [11, 11, 0, 0] and out["completion_mask"].tolist()[1] == [1, 1, 0, 0]
    assert out["old_per_token_logps"].tolist()[0] == [-1.0, -1.0, 0.0, 0.0]
    assert out["advantages"].tolist() == [12.0, 13.0, 20.0, 21.0]
    assert out["mm_token_type_ids"].tolist()[0] == [0, 0, 1, 1, 1, 0, 0, 0, 0]     # prompt part left-padded
    assert out["mm_token_type_ids"].shape == (4, 9) and out["num_images"] == [1, 1, 1, 1]
    assert [float(p[0, 0]) for p in out["pixel_values"]] == [12.0, 13.0, 20.0, 21.0]
    assert "num_items_in_batch" not in out


def test_train_settings_and_errors(sft_run, tmp_path, capsys):
    from vlm.cli import main
    from vlm.train import DEFAULTS, parse_lora, resolve_settings

    d, _ = sft_run
    assert resolve_settings("grpo", "Qwen/Qwen2.5-VL-3B-Instruct", {})["lr"] == DEFAULTS["grpo"]["lr"]
    tiny = resolve_settings("grpo", d / "tiny", {"lr": 1e-4, "temperature": None})
    assert tiny["lr"] == 1e-4 and tiny["max_completion_length"] == 64 and tiny["temperature"] == 1.0
    assert parse_lora("16,32") == (16, 32) and parse_lora(None) is None
    assert main(["train", "--stage", "grpo", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"), "--out",
                 str(tmp_path / "r"), "--batch-size", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch-size 6 (completions per step) must be a multiple of --num-generations 4" in err and "\n" not in err
    assert main(["train", "--stage", "sft", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"), "--out",
                 str(tmp_path / "r"), "--lora", "16"]) == 2
    assert "--lora '16': give the rank and alpha" in capsys.readouterr().err
    import importlib.util

    from vlm.prompts import VlmError

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(VlmError, match="--vllm colocate: vllm is not installed; `pip install vllm`"):
            resolve_settings("grpo", d / "tiny", {"vllm": "colocate"})
    with pytest.raises(VlmError, match="--vllm 'fast': give one of colocate, server"):
        resolve_settings("grpo", d / "tiny", {"vllm": "fast"})


def test_lora_and_frozen_vision_train_the_right_weights(sft_run, tmp_path):
    from safetensors.torch import load_file

    from vlm.train import train

    d, _ = sft_run
    base = load_file(d / "tiny" / "model.safetensors")
    train("sft", d / "train.jsonl", d / "tiny", tmp_path / "lora", max_steps=2, lora=(4, 8), progress=False)
    merged = load_file(tmp_path / "lora" / "model.safetensors")
    assert set(merged) == set(base)                                  # merged: no adapter keys left
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # (saved in Qwen2.5-VL's checkpoint layout: "model.layers.*" is the language model, "visual.*" the tower)
    assert changed and all(k.startswith("model.layers.") and "proj" in k for k in changed)
    train("sft", d / "train.jsonl", d / "tiny", tmp_path / "fv", max_steps=2, freeze_vision=True, progress=False)
    fv = load_file(tmp_path / "fv" / "model.safetensors")
    assert all(torch.equal(base[k], fv[k]) for k in base if "visual" in k)
    assert any(not torch.equal(base[k], fv[k]) for k in base if k.startswith("model.layers."))


def _bytes(folder) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_rerun_of_a_finished_run_changes_nothing_and_other_settings_are_refused(sft_run, tmp_path, capsys):
    """A finished grpo run rerun as it was: no step trained, RUN_DIR unchanged (trl's GRPOTrainer, resumed at
    --max-steps mid-epoch, trained one step more); rerun with another --lr, or as another stage on an SFT
    RUN_DIR: refused, one line naming what differs. `vlm eval` of the run generates its completion length."""
    from vlm.cli import main

    d, _ = sft_run
    out = tmp_path / "g"
    args = ["-q", "train", "--stage", "grpo", "--data", str(d / "train.jsonl"), "--model", str(d / "sft"), "--out",
            str(out), "--max-steps", "1", "--max-completion-length", "12", "--reward-weights", "0.2,0.8"]
    assert main(args) == 0
    weights, summary = _bytes(out), (out / "train_summary.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "this grpo run is finished (1 steps); nothing trained or changed" in capsys.readouterr().out
    assert _bytes(out) == weights and (out / "train_summary.json").read_text() == summary
    assert main([*args, "--lr", "0.002"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]           # the error: one line, after the logs
    assert err.startswith("vlm: ") and "holds a grpo run with other settings or data (--lr: 0.0003 -> 0.002)" in err
    sft_args = ["train", "--stage", "grpo", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"), "--out",
                str(d / "sft"), "--max-steps", "101"]
    assert main(sft_args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlm: ") and "holds a sft run with other settings or data (stage: 'sft' -> 'grpo'" in err
    assert main(["-q", "eval", "--model", str(out), "--data", str(d / "test.jsonl"), "--out", str(tmp_path / "r.json"),
                 "--limit", "2"]) == 0
    cfg = json.loads((tmp_path / "r.json").read_text())["config"]
    assert cfg["max_new_tokens"] == 12 and cfg["reward_weights"] == [0.2, 0.8]
    assert cfg["run_settings_from"] == str(out / "train_summary.json")


def test_lora_runs_resume_from_the_adapter_and_a_last_checkpoint_completes_without_a_step(sft_run, tmp_path):
    """trl's checkpoints of a LoRA run hold the adapter (no config.json): a rerun loads the model, then the
    adapter. A checkpoint already at --max-steps (RUN_DIR not written yet) gives RUN_DIR without a step."""
    from safetensors.torch import load_file

    from vlm.train import train

    d, _ = sft_run
    out, kw = tmp_path / "lora", dict(lora=(4, 8), save_steps=1, progress=False)
    train("sft", d / "train.jsonl", d / "tiny", out, max_steps=1, **kw)
    ckpt = out / "checkpoints" / "checkpoint-1"
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "config.json").exists()
    first = load_file(out / "model.safetensors")
    (out / "train_summary.json").unlink()                           # as if stopped while writing RUN_DIR
    (out / "model.safetensors").unlink()
    s = train("sft", d / "train.jsonl", d / "tiny", out, max_steps=1, **kw)
    assert s["steps"] == 1 and s["resumed_from"] == str(ckpt) and len([e for e in s["log"] if "loss" in e]) == 1
    again = load_file(out / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)      # the adapter of step 1, merged again
    s = train("sft", d / "train.jsonl", d / "tiny", out, max_steps=2, **kw)
    assert s["steps"] == 2 and s["resumed_from"] == str(ckpt)
    losses = [e["loss"] for e in s["log"] if "loss" in e]
    assert len(losses) == 2
    assert json.loads((out / "run.json").read_text())["settings"]["lora"] == [4, 8]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_run_that_failed_before_its_first_step_accepts_the_corrected_retry(sft_run, tmp_path, capsys):
    """`--device cuda` without a GPU: one line, before anything is trained; the retry on the same folder runs.
    Where to run (--device) is not the run's identity: a finished run asked again on another device is
    finished, not refused."""
    from vlm.cli import main

    d, _ = sft_run
    args = ["-q", "train", "--stage", "sft", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"), "--out",
            str(tmp_path / "r"), "--max-steps", "1", "--save-steps", "1"]
    assert main([*args, "--device", "cuda", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlm: ") and "device 'cuda:0' asked for, but torch sees no CUDA GPU; use --device cpu" in err
    assert main([*args, "--device", "cpu"]) == 0
    assert main([*args, "--device", "auto"]) == 0
    assert "this sft run is finished (1 steps)" in capsys.readouterr().out


def test_the_caption_stage_has_its_own_prompt():
    """Captions are trained under a system prompt that asks for a description, not <think>/<answer>."""
    from vlm.prompts import CAPTION_QUESTION, CAPTION_SYSTEM_PROMPT, SYSTEM_PROMPT
    from vlm.train import example

    row = {"images": ["t.png"], "caption": "Crowded atypical nuclei.", "question": "Which?", "options": ["a", "b"],
           "answer": "A", "reasoning": "r"}
    cap = example(row, "caption")
    assert cap["prompt"][0]["content"][0]["text"] == CAPTION_SYSTEM_PROMPT
    assert "<think>" not in CAPTION_SYSTEM_PROMPT and "<answer>" not in CAPTION_SYSTEM_PROMPT
    assert cap["prompt"][1]["content"] == [{"type": "image"}, {"type": "text", "text": CAPTION_QUESTION}]
    assert cap["completion"][0]["content"][0]["text"] == "Crowded atypical nuclei."
    assert example(row, "sft")["prompt"][0]["content"][0]["text"] == SYSTEM_PROMPT
    assert len(example(row, "caption", system=None)["prompt"]) == 1          # no system turn asked for


@pytest.fixture(scope="module")
def judge_url():
    """A real OpenAI-compatible HTTP judge on 127.0.0.1 (tests/test_vlm_rewards.JudgeHandler)."""
    import threading
    from http.server import ThreadingHTTPServer

    from test_vlm_rewards import JudgeHandler

    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_grpo_with_grounding_and_judge_process_rewards(sft_run, judge_url, tmp_path, capsys):
    from test_vlm_rewards import JudgeHandler

    from vlm.cli import main

    d, _ = sft_run
    JudgeHandler.requests.clear()
    args = ["-q", "train", "--stage", "grpo", "--data", str(d / "train.jsonl"), "--model", str(d / "sft"),
            "--out", str(tmp_path / "proc"), "--max-steps", "1", "--grounding", "pathoclip-tiny",
            "--judge-url", f"{judge_url}/good/v1", "--judge-model", "judge-7b"]
    assert main([*args, "--reward-weights", "0.1,0.9,0.25,0.5"]) == 0
    s = json.loads((tmp_path / "proc" / "train_summary.json").read_text())
    e = next(e for e in s["log"] if "reward" in e)
    g, j = e["rewards/grounding_reward/mean"], e["rewards/judge_reward/mean"]
    assert 0.0 <= g <= 1.0 and j == pytest.approx(0.8)                # the server's 0.6 / 1.0 -> 0.8
    assert e["reward"] == pytest.approx(0.1 * e["rewards/format_reward/mean"] + 0.9 * e["rewards/accuracy_reward/mean"]
                                        + 0.25 * g + 0.5 * j)
    assert len(JudgeHandler.requests) == 8                           # one per completion (2 prompts x 4)
    assert "Which tissue does this tile show?\nA. normal\nB. tumor" in JudgeHandler.requests[0]["text"]
    assert any(p.get("type") == "image_url" for p in JudgeHandler.requests[0]["body"]["messages"][1]["content"])
    assert s["settings"]["grounding"] == "pathoclip-tiny" and s["settings"]["judge_model"] == "judge-7b"
    # the judge's URL is in no file of the run (a digest stands in for it in the settings)
    netloc = judge_url.split("//")[1]
    assert s["settings"]["judge_url"].startswith("sha256:")
    assert not [f for f in (tmp_path / "proc").rglob("*") if f.is_file() and netloc.encode() in f.read_bytes()]
    # two weights: the process rewards get PROCESS_WEIGHT each; a wrong count is one readable line
    from vlm.reward_set import PROCESS_WEIGHT, reward_functions
    from vlm.train import resolve_settings

    st = resolve_settings("grpo", d / "sft", {"grounding": "pathoclip-tiny", "judge_url": judge_url, "judge_model": "j"})
    from vlm.model import load_model

    processor = load_model(d / "sft")[1]
    from vlm.data import read_jsonl

    funcs, ws = reward_functions("grpo", processor, st, device="cpu", rows=read_jsonl(d / "train.jsonl", "grpo").rows)
    assert [f.__name__ for f in funcs] == ["format_reward", "accuracy_reward", "grounding_reward", "judge_reward"]
    assert ws == [0.1, 0.9, PROCESS_WEIGHT, PROCESS_WEIGHT]
    capsys.readouterr()
    assert main([*args, "--reward-weights", "0.1,0.9,0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(one weight each for format,accuracy,grounding,judge)" in err and "\n" not in err
    assert main([*args[:-2], "--reward-weights", "0.1,0.9"]) == 2
    assert "needs both --judge-url and --judge-model" in capsys.readouterr().err


class _Evil:
    """A pickle that would run code when loaded without weights_only."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_resume_refuses_a_checkpoint_pickle_that_would_run_code(sft_run, tmp_path, monkeypatch, capsys):
    import pickle
    import shutil

    from vlm.cli import main

    d, _ = sft_run
    monkeypatch.chdir(tmp_path)
    args = ["-q", "train", "--stage", "sft", "--data", str(d / "train.jsonl"), "--model", str(d / "tiny"), "--out",
            str(tmp_path / "run"), "--save-steps", "1"]
    assert main([*args, "--max-steps", "1"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "pytorch_model.bin").exists()
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": _Evil(), "param_groups": []}))
    assert main([*args, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]             # the error: one line, after the logs
    assert err.startswith("vlm: ") and "checkpoint-1: a checkpoint file holds more than tensors and was not read" in err
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    shutil.rmtree(ckpt)                                              # the fix the message names
    assert main([*args, "--max-steps", "2"]) == 0


def test_torchrun_two_processes_train_sft_and_dapo_and_write_one_run(sft_run, tmp_path):
    """What `accelerate launch -m vlm.cli train` does on several GPUs, on 2 CPU processes (gloo): the
    trainer runs data-parallel, DAPO's dynamic sampling keeps the processes' collectives aligned, and the
    main process alone writes RUN_DIR and reports."""
    import subprocess
    import sys

    d, _ = sft_run
    for stage, data, model, extra in (("sft", "train.jsonl", d / "tiny", []),
                                      ("dapo", "train.jsonl", d / "sft", ["--max-tries", "2"])):
        out = tmp_path / stage
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlm.cli",
                            "-q", "train", "--stage", stage, "--data", str(d / data), "--model", str(model), "--out",
                            str(out), "--max-steps", "2", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        reports = [line for line in r.stdout.splitlines() if line.startswith(f"{stage}: ")]
        assert len(reports) == 1 and reports[0].startswith(f"{stage}: 2 steps")
        s = json.loads((out / "train_summary.json").read_text())
        assert s["processes"] == 2 and s["steps"] == 2 and (out / "model.safetensors").is_file()
    steps = [e for e in s["log"] if "reward" in e]
    assert len(steps) == 2 and all(1 <= e["dynamic_sampling/tries"] <= 2 for e in steps)
