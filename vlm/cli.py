"""`vlm`: the pathology reasoner (Qwen2.5-VL / Patho-R1 on trl).

Every command is a thin layer over the Python API (vlm.tiny, vlm.data, vlm.train, vlm.evaluate, vlm.ask). Errors a
user can cause end as one line and exit status 2 (the traceback with -v).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wsi.cli_common import command_parser, run_command
from wsi.paths import add_data_path_options


def _cmd_make_tiny(a: argparse.Namespace) -> int:
    from .tiny import make_tiny

    s = make_tiny(a.out_dir, seed=a.seed)
    print(f"tiny Qwen2.5-VL written to {s['out']}: {s['parameters'] / 1e6:.2f}M parameters, vocabulary "
          f"{s['vocab_size']}, {s['bytes'] / 1e6:.1f} MB (random weights: it demonstrates the pipeline; real "
          "answers need a real checkpoint)")
    return 0


def _cmd_data(a: argparse.Namespace) -> int:
    from .data import make_data

    classes = [c.strip() for c in a.classes.split(",")] if a.classes else None
    s = make_data(a.store, a.labels, a.captions, a.out, classes=classes, question=a.question, slides=a.slides,
                  max_per_class=a.max_per_class, seed=a.seed)
    print(json.dumps(s, indent=1))
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .rewards import parse_reward_weights
    from .train import parse_lora, train

    weights = parse_reward_weights(a.reward_weights, None) if a.reward_weights else None   # count: train checks
    s = train(a.stage, a.data, a.model, a.out, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
              batch_size=a.batch_size, grad_accum=a.grad_accum, num_generations=a.num_generations,
              max_completion_length=a.max_completion_length, temperature=a.temperature, beta=a.beta,
              lora=parse_lora(a.lora), freeze_vision=a.freeze_vision or None, seed=a.seed, reward_weights=weights,
              save_steps=a.save_steps, max_tries=a.max_tries, filter_on=a.filter_on, grounding=a.grounding,
              judge_url=a.judge_url, judge_model=a.judge_model, judge_key_env=a.judge_key_env,
              judge_timeout=a.judge_timeout, judge_text_only=a.judge_text_only or None, vllm=a.vllm,
              device=a.device, progress=not a.quiet, data_root=a.data_root, allow_remote=a.allow_remote)
    if int(os.environ.get("RANK", "0")):
        return 0                        # under accelerate / torchrun, the main process reports
    if s.get("already_finished"):
        print(f"{a.out}: this {a.stage} run is finished ({s['steps']} steps); nothing trained or changed (a larger "
              "--max-steps or --epochs trains on)")
        return 0
    losses = [e["loss"] for e in s["log"] if "loss" in e]
    rewards = [e["reward"] for e in s["log"] if e.get("reward") is not None]   # None: no group kept (dapo)
    what = (f"reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no steps")
    print(f"{a.stage}: {s['steps']} steps in {s['seconds']:.1f} s ({what}); model folder {a.out}")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .rewards import parse_reward_weights

    weights = parse_reward_weights(a.reward_weights) if a.reward_weights else None     # None: the run's
    r = evaluate(a.model, a.data, a.out, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                 temperature=a.temperature, weights=weights, limit=a.limit, seed=a.seed, device=a.device,
                 progress=not a.quiet, data_root=a.data_root, allow_remote=a.allow_remote)
    m = r["metrics"]
    print(f"{m['n']} questions: accuracy {m['accuracy']:.3f}, format rate {m['format_rate']:.3f}, mean reward "
          f"{m['mean_reward']:.3f}; per-item answers in {a.out}")
    return 0


def _cmd_ask(a: argparse.Namespace) -> int:
    from .ask import ask, format_answer

    options = [o.strip() for o in a.options.split("|")] if a.options else None
    r = ask(a.store, a.slide, a.question, a.model, run=a.run, clip=a.clip, top_k=a.top_k, options=options,
            montage=a.montage or Path(f"ask-{a.slide}.png"), max_new_tokens=a.max_new_tokens,
            temperature=a.temperature, device=a.device)
    if a.json:
        print(json.dumps({k: r[k] for k in ("answer", "reasoning", "tiles", "montage", "selection", "completion")}))
    else:
        print(format_answer(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import QUESTION

    p, sub = command_parser("vlm", "The pathology reasoner: a vision-language model asked about tiles.")
    t = sub.add_parser("make-tiny", help="a tiny random-weight Qwen2.5-VL model folder (tests, demo)",
                       description="Writes OUT_DIR: config.json, model.safetensors, tokenizer (trained offline), "
                                   "the Qwen2.5-VL chat template and processors, pathmil_defaults.json.")
    t.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="a new (or empty) folder")
    t.add_argument("--seed", type=int, default=0, help="the random weights' seed (default: 0)")
    t.set_defaults(func=_cmd_make_tiny)

    d = sub.add_parser("data", help="caption.jsonl, mcq.jsonl and sft.jsonl from a tile store",
                       description="caption.jsonl from a `clip captions` CSV; mcq.jsonl: one multiple-choice "
                                   "question per labelled tile, one option per class; sft.jsonl: the MCQs with "
                                   "a templated reasoning. Images are store references {store, slide, tile}.")
    d.add_argument("store", metavar="STORE", help="the tile store")
    d.add_argument("--labels", required=True, help="the per-tile labels the questions ask about")
    d.add_argument("--captions", type=Path, required=True, help="a captions CSV of the store's tiles (clip captions)")
    d.add_argument("--out", type=Path, required=True, help="the folder for the three JSONL files")
    d.add_argument("--classes", default=None, help="class names, comma-separated; binary labels: negative,positive "
                                                   "(default: normal,tumor)")
    d.add_argument("--question", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    d.add_argument("--slides", nargs="+", default=None,
                   help="only these slides, for the MCQs and the captions (default: every complete slide)")
    d.add_argument("--max-per-class", type=int, default=None, help="at most this many tiles of each class")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_cmd_data)

    r = sub.add_parser("train", help="train a stage: caption / sft (trl SFTTrainer), grpo / dapo (GRPOTrainer)",
                       description="Trains one stage on a JSONL file (`vlm data` writes them) and writes RUN_DIR, a "
                                   "model folder that every --model accepts. A rerun resumes from RUN_DIR/checkpoints, "
                                   "leaves a finished run as it is, and refuses another stage, data or settings. "
                                   "Unset flags come from the model folder's pathmil_defaults.json (vlm make-tiny "
                                   "writes one), else defaults for real 3B/7B checkpoints.")
    r.add_argument("--stage", required=True, choices=("caption", "sft", "grpo", "dapo"))
    r.add_argument("--data", type=Path, required=True, help="the stage's JSONL (caption.jsonl, sft.jsonl, mcq.jsonl)")
    add_data_path_options(r, "the JSONL")
    r.add_argument("--model", required=True, help="a model folder (vlm make-tiny, an earlier stage) or a hub id")
    r.add_argument("--out", type=Path, required=True, help="RUN_DIR: the trained model folder")
    r.add_argument("--epochs", type=float, default=None)
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    r.add_argument("--lr", type=float, default=None, help="learning rate")
    r.add_argument("--batch-size", type=int, default=None, help="rows per device step (grpo/dapo: completions, a "
                                                                "multiple of --num-generations)")
    r.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    r.add_argument("--num-generations", type=int, default=None, help="grpo/dapo: completions per prompt (the group)")
    r.add_argument("--max-completion-length", type=int, default=None, help="grpo/dapo: tokens per completion")
    r.add_argument("--temperature", type=float, default=None, help="grpo/dapo: sampling temperature")
    r.add_argument("--beta", type=float, default=None, help="grpo: KL weight (dapo: 0)")
    r.add_argument("--lora", default=None, help="r,alpha: LoRA adapters on the language model (merged at the end)")
    r.add_argument("--freeze-vision", action="store_true", help="keep the vision tower's weights fixed")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--reward-weights", default=None, help="format,accuracy[,grounding][,judge] (default: Patho-R1's "
                                                          "0.1,0.9, and 0.5 for each process reward)")
    r.add_argument("--grounding", default=None, metavar="CLIP", help="grpo/dapo: add the PathoCLIP grounding process "
                                                                    "reward with this model (a `clip train` RUN_DIR or "
                                                                    "a PathoCLIP name)")
    r.add_argument("--judge-url", default=None, help="grpo/dapo: add PathVLM-R1's judge process reward from this "
                                                     "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    r.add_argument("--judge-model", default=None, help="the model name the judge endpoint serves")
    r.add_argument("--judge-key-env", default=None, help="the environment variable holding the judge's API key "
                                                         "(default: OPENAI_API_KEY; unset: no key sent)")
    r.add_argument("--judge-timeout", type=float, default=None, help="seconds per judge request (default: 30; a "
                                                                     "timeout scores the fallback; a batch ends "
                                                                     "after 4x this)")
    r.add_argument("--judge-text-only", action="store_true", help="send the judge the text only, not the tile "
                                                                  "images (for endpoints without image input)")
    r.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: 50)")
    r.add_argument("--max-tries", type=int, default=None, help="dapo: generation rounds per batch for dynamic "
                                                                "sampling (default: 4)")
    r.add_argument("--filter-on", default=None, choices=("accuracy", "total"),
                   help="dapo: drop the groups whose accuracy rewards all agree (accuracy, DAPO's rule; default) or "
                        "whose weighted total rewards all agree (total)")
    r.add_argument("--vllm", default=None, choices=("colocate", "server"),
                   help="grpo/dapo on a GPU: generate with vLLM (trl's use_vllm; colocate shares this process's GPU, "
                        "server needs `trl vllm-serve`)")
    r.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda ...")
    r.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="answer an MCQ JSONL and score it: accuracy, format rate, mean reward",
                       description="Batched generation over the rows of an eval JSONL (`vlm data` writes mcq.jsonl), "
                                   "each answer scored with the training rewards; RESULT.json holds the metrics and "
                                   "one entry per question (response, parsed answer, correct, format, reward).")
    e.add_argument("--model", required=True, help="a model folder (vlm make-tiny, vlm train) or a hub id")
    e.add_argument("--data", type=Path, required=True, help="the questions (JSONL, as mcq.jsonl of `vlm data`)")
    add_data_path_options(e, "the JSONL")
    e.add_argument("--out", type=Path, required=True, help="RESULT.json to write")
    e.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    e.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's --max-completion-length (its train_summary.json), else the model "
                        "folder's grpo default (pathmil_defaults.json), else 1024")
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled")
    e.add_argument("--reward-weights", default=None, help="format,accuracy weights of the reward (default: the "
                                                          "run's, else Patho-R1's 0.1,0.9)")
    e.add_argument("--limit", type=int, default=None, help="only the first N questions")
    e.add_argument("--seed", type=int, default=0, help="the sampling seed when --temperature > 0 (default: 0)")
    e.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")
    e.set_defaults(func=_cmd_eval)

    k = sub.add_parser("ask", help="ask the reasoner about a slide's most telling tiles",
                       description="Picks the slide's top-k tiles by a MIL run's stored instance scores (--run, "
                                   "written by `mil predict`) or by PathoCLIP similarity to the question (--clip), "
                                   "sends them as one multi-image prompt, prints the reasoning, the answer and the "
                                   "tiles used, and saves a montage of the tiles with their scores.")
    k.add_argument("--store", required=True, help="the tile store")
    k.add_argument("--slide", required=True, help="the slide id")
    k.add_argument("--question", required=True, help="the question")
    k.add_argument("--options", default=None, help="answer options separated by '|' (a multiple-choice question)")
    k.add_argument("--model", required=True, help="a model folder (vlm make-tiny, vlm train) or a hub id")
    how = k.add_mutually_exclusive_group(required=True)
    how.add_argument("--run", default=None, help="the name of the slide's predictions in the store (`mil predict "
                                                  "--name`): tiles by their instance_score")
    how.add_argument("--clip", default=None, help="a PathoCLIP model (a `clip train` RUN_DIR or a name): tiles by "
                                                   "similarity to the question")
    k.add_argument("--top-k", type=int, default=8, help="tiles to send (default: 8)")
    k.add_argument("--montage", type=Path, default=None, help="the montage PNG (default: ask-SLIDE.png here)")
    k.add_argument("--json", action="store_true", help='print {"answer", "reasoning", "tiles", "montage", ...}')
    k.add_argument("--max-new-tokens", type=int, default=512, help="default: 512")
    k.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    k.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda ...")
    k.set_defaults(func=_cmd_ask)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
