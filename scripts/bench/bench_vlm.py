"""Reasoner (vlm) benchmarks.

    .venv/bin/python scripts/bench/bench_vlm.py step [--steps 40] [--repeats 3] [--json OUT.json]
    python scripts/bench/bench_vlm.py gpu [--shape 3b] [--lora 16,32] [--steps 4] [--json OUT.json]   (on a GPU)

step: `vlm train --stage grpo` (vlm.train.train: pathmil's settings, lazy dataset, rewards, merge and save)
      against bare trl on the same model, data and config: AutoModelForImageTextToText + AutoProcessor,
      a datasets.Dataset of the same prompts with PIL images, GRPOConfig / GRPOTrainer with the same
      settings and reward functions, save_pretrained. Dynamic sampling is off (stage grpo). Both start
      from the same short-SFT tiny model (`vlm make-tiny`, 60 SFT steps on a red/blue toy MCQ) and the same
      seed, in the same process, interleaved; the ratio is ours / bare of the fastest of `--repeats` runs,
      for the whole call (load, train, save) and for trl's own per-step time (step_time, summed). Target <= 1.05.
gpu:  a Qwen2.5-VL-3B-shaped model with random weights (text 2048 x 36 layers, vision 1280 x 32, the real
      vocabulary size) in bf16 with LoRA adapters, `vlm train --stage grpo` for `--steps` steps: peak GPU
      memory, generation tokens/s (a batch of `--gen-batch` prompts, `--max-new` new tokens, greedy, outside
      training), trl's step time; then the same with trl's vLLM colocate mode when vllm is installed (else
      the JSON says it is not). `--shape tiny --device cpu` runs the same code on the tiny model (a check).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def toy_data(d: Path, n: int = 32, seed: int = 0) -> Path:
    """d/mcq.jsonl: n questions about 56 px PNG tiles, red = tumor, blue = normal (file-path images)."""
    import numpy as np
    from PIL import Image

    from vlm.data import FINDINGS

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = i % 2
        px = rng.integers(0, 80, (56, 56, 3)).astype(np.uint8)
        px[..., 0 if t else 2] += 170
        Image.fromarray(px).save(d / f"tile{i:03d}.png")
        opts = ["normal", "tumor"]
        rows.append({"images": [f"tile{i:03d}.png"], "question": "Which tissue does this tile show?", "options": opts,
                     "answer": "AB"[t], "reasoning": f"The tile shows {FINDINGS[opts[t]]}."})
    (d / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "mcq.jsonl"


def bare_trl(data: Path, model: Path, out: Path, steps: int, seed: int = 0) -> dict:
    """Seconds of a plain trl GRPO run with vlm.train's settings for the tiny model; trl's step times."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from vlm.prompts import build_messages
    from vlm.rewards import accuracy_reward, make_format_reward
    from vlm.tiny import read_defaults

    t0 = time.perf_counter()
    d = read_defaults(model)["grpo"]
    set_seed(seed)
    net = AutoModelForImageTextToText.from_pretrained(model)
    processor = AutoProcessor.from_pretrained(model)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": build_messages(r, 1),
                             "images": [Image.open(data.parent / r["images"][0]).convert("RGB")],
                             "answer": r["answer"], "options": r["options"], "question": r["question"]} for r in rows])
    args = GRPOConfig(output_dir=str(out), learning_rate=d["lr"], per_device_train_batch_size=d["batch_size"],
                      num_generations=d["num_generations"], max_completion_length=d["max_completion_length"],
                      temperature=d["temperature"], beta=d["beta"], max_steps=steps, seed=seed, logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, bf16=False, lr_scheduler_type="constant",
                      warmup_steps=0, remove_unused_columns=False, top_k=0, top_p=1.0, disable_tqdm=True,
                      reward_weights=[0.1, 0.9], loss_type="grpo")
    trainer = GRPOTrainer(model=net, args=args, train_dataset=ds, processing_class=processor,
                          reward_funcs=[make_format_reward(False), accuracy_reward])
    trainer.train()
    trainer.model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"seconds": time.perf_counter() - t0, **step_stats(trainer.state.log_history)}


def step_stats(log: list[dict]) -> dict:
    """trl's step time summed over the steps, and the completion tokens generated (mean length x 8 per step):
    sampled completions differ between runs, so time per completion token is compared too."""
    steps = [e for e in log if "step_time" in e]
    tokens = sum(e["completions/mean_length"] * 8 for e in steps)
    return {"step_time": sum(e["step_time"] for e in steps), "completion_tokens": tokens}


def ours(data: Path, model: Path, out: Path, steps: int, seed: int = 0) -> dict:
    from vlm.train import train

    t0 = time.perf_counter()
    s = train("grpo", data, model, out, max_steps=steps, seed=seed, save_steps=10 ** 6, progress=False)
    return {"seconds": time.perf_counter() - t0, **step_stats(s["log"])}


def cmd_step(a: argparse.Namespace) -> dict:
    import shutil

    import torch

    from vlm.tiny import make_tiny
    from vlm.train import train

    torch.set_num_threads(1)            # what vlm.train.setup_device picks on a 2-core machine; the same for both
    work = Path(tempfile.mkdtemp(prefix="bench_vlm_"))
    data = toy_data(work)
    make_tiny(work / "tiny")
    train("sft", data, work / "tiny", work / "sft", max_steps=60, progress=False)
    runs: dict[str, list[dict]] = {"pathmil": [], "trl": []}
    for r in range(a.repeats):
        for name, fn in (("pathmil", ours), ("trl", bare_trl)):
            out = work / f"{name}{r}"
            runs[name].append(fn(data, work / "sft", out, a.steps))
            shutil.rmtree(out, ignore_errors=True)
            x = runs[name][-1]
            x["ms_per_token"] = 1000 * x["step_time"] / x["completion_tokens"]
            print(f"  {name:8s} run {r}: {x['seconds']:.2f} s (trl step_time sum {x['step_time']:.2f} s, "
                  f"{x['completion_tokens']:.0f} completion tokens, {x['ms_per_token']:.2f} ms/token)", flush=True)
    best = {k: {m: min(x[m] for x in v) for m in ("seconds", "step_time", "ms_per_token")} for k, v in runs.items()}
    res = {"bench": "vlm step", "steps": a.steps, "repeats": a.repeats, "torch_threads": 1, "runs": runs,
           "fastest": best, **{f"ratio_{m}": best["pathmil"][m] / best["trl"][m]
                               for m in ("seconds", "step_time", "ms_per_token")}}
    print(f"GRPO, {a.steps} steps, fastest of {a.repeats}: whole call pathmil {best['pathmil']['seconds']:.2f} s vs trl "
          f"{best['trl']['seconds']:.2f} s = {res['ratio_seconds']:.3f}x; trl step time "
          f"{best['pathmil']['step_time']:.2f} vs {best['trl']['step_time']:.2f} s = {res['ratio_step_time']:.3f}x; "
          f"per completion token {best['pathmil']['ms_per_token']:.2f} vs {best['trl']['ms_per_token']:.2f} ms = "
          f"{res['ratio_ms_per_token']:.3f}x (target <= 1.05)")
    shutil.rmtree(work, ignore_errors=True)
    return res


def shaped_model(out: Path, shape: str, device: str) -> dict:
    """A random-weight Qwen2.5-VL model folder of `shape` ("3b": Qwen2.5-VL-3B's sizes; "tiny"), saved in bf16,
    with the tiny model's tokenizer and processors (the vocabulary size stays the real one)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlm.tiny import make_tiny

    make_tiny(out)
    if shape == "tiny":
        return {"parameters": None}
    cfg = json.loads((out / "config.json").read_text())
    text = dict(cfg["text_config"], vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_window_layers=36, tie_word_embeddings=True,
                max_position_embeddings=128000)
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_section=[16, 24, 24])   # head_dim 128: 64 = 16+24+24
    text.pop("layer_types", None)       # derived from the depth; the tiny one's would not match
    vision = dict(cfg["vision_config"], depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=2048, fullatt_block_indexes=[7, 15, 23, 31])
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k not in ("text_config", "vision_config", "model_type",
                                                                           "architectures", "transformers_version")},
                              text_config=text, vision_config=vision)
    config.tie_word_embeddings = True
    with torch.device(device if device.startswith("cuda") else "cpu"):
        net = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    for f in out.glob("model*.safetensors"):
        f.unlink()
    net.save_pretrained(out)
    n = sum(p.numel() for p in net.parameters())
    del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"parameters": n}


def cmd_gpu(a: argparse.Namespace) -> dict:
    import importlib.util

    import torch

    from vlm.model import generate, load_model
    from vlm.prompts import build_messages
    from vlm.train import parse_lora, train

    work = Path(tempfile.mkdtemp(prefix="bench_vlm_gpu_"))
    data = toy_data(work, n=max(16, a.batch_size * 2))
    cuda = a.device.startswith("cuda")
    t0 = time.perf_counter()
    info = shaped_model(work / "model", a.shape, a.device)
    res: dict = {"bench": "vlm gpu", "shape": a.shape, "device": a.device, "lora": a.lora, **info,
                 "build_seconds": round(time.perf_counter() - t0, 1),
                 "gpu": torch.cuda.get_device_name() if cuda else None}
    # generation tokens/s outside training (greedy, random weights rarely stop early: max_new tokens each)
    net, proc = load_model(work / "model", device=a.device)
    rows = [json.loads(x) for x in data.read_text().splitlines()][:a.gen_batch]
    from PIL import Image

    imgs = [[Image.open(work / r["images"][0]).convert("RGB")] for r in rows]
    msgs = [build_messages(r, 1) for r in rows]
    generate(net, proc, msgs[:2], imgs[:2], max_new_tokens=8)          # warm-up
    new_ids: list = []
    plain_generate = net.generate

    def counting_generate(**kw):        # the new token ids, to count what was generated (pads excluded)
        out = plain_generate(**kw)
        new_ids.append(out[:, kw["input_ids"].shape[1]:])
        return out

    net.generate = counting_generate
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    generate(net, proc, msgs, imgs, max_new_tokens=a.max_new)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    n_tok = int((new_ids[-1] != proc.tokenizer.pad_token_id).sum())
    res["generation"] = {"prompts": len(rows), "max_new_tokens": a.max_new, "seconds": round(dt, 2),
                         "tokens": n_tok, "tokens_per_s": round(n_tok / dt, 1)}
    del net
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    modes = [("plain", {})]
    if importlib.util.find_spec("vllm") is not None:
        modes.append(("vllm-colocate", {"vllm": "colocate"}))
    else:
        res["vllm"] = "not installed (pip install vllm): colocate mode not measured"
    for name, extra in modes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        s = train("grpo", data, work / "model", work / f"run-{name}", max_steps=a.steps, lora=parse_lora(a.lora),
                  batch_size=a.batch_size, num_generations=4, max_completion_length=a.max_new, lr=1e-5,
                  save_steps=10 ** 6, device=a.device, progress=False, **extra)
        steps = [e for e in s["log"] if "step_time" in e]
        res[name] = {"steps": len(steps), "seconds": s["seconds"],
                     "step_time_s": [round(e["step_time"], 3) for e in steps],
                     "mean_completion_tokens": [e.get("completions/mean_length") for e in steps],
                     "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None}
        print(f"{name}: {len(steps)} steps, step time {res[name]['step_time_s']} s, peak GPU memory "
              f"{res[name]['peak_gpu_gib']} GiB", flush=True)
    print(f"generation: {res['generation']['tokens_per_s']} tokens/s ({len(rows)} prompts x {a.max_new} new tokens)")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("step", help="vlm train --stage grpo vs bare trl (CPU)")
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--repeats", type=int, default=3)
    g = sub.add_parser("gpu", help="3B-shaped bf16 + LoRA: peak memory, generation tokens/s, step time")
    g.add_argument("--shape", choices=("3b", "tiny"), default="3b")
    g.add_argument("--device", default="cuda")
    g.add_argument("--lora", default="16,32")
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=8, help="completions per step (multiple of 4)")
    g.add_argument("--gen-batch", type=int, default=8)
    g.add_argument("--max-new", type=int, default=256)
    for q in (s, g):
        q.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    res = cmd_step(a) if a.cmd == "step" else cmd_gpu(a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
