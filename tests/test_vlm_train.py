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
