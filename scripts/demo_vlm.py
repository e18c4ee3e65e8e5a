"""The demo's reasoner stage: the pipeline of `vlm` on the cohort, with a tiny model.

A tiny random-weight Qwen2.5-VL (`vlm make-tiny`) is trained briefly through the three stages, each from the
previous one's output: caption pretraining on the PathoCLIP stage's training captions, chain-of-thought SFT
on tile MCQs ("Which tissue does this tile show?") of the training slides, then GRPO on the same MCQs. The
held-out slides' MCQs (as many tumour as normal tiles) are answered before training, after SFT and after
GRPO (`vlm eval`: accuracy, format rate and mean reward of greedy answers, and the mean reward of answers
sampled at temperature 1, the kind GRPO learns from). Finally the trained model is asked about a tumour
slide's top tiles by the MIL run's stored scores (`vlm ask`), with the montage of those tiles.

The tiny model demonstrates the pipeline, not pathology: on seed 0's split it goes from no valid answer to
~0.9 held-out accuracy, on other splits SFT can end at one constant answer (measured on seed 1: 0.29).

Resumes: the tiny model and every finished stage (RUN_DIR/train_summary.json) are kept and the metrics of
finished stages are read back from vlm_metrics.json; a stage cut short runs again (its only checkpoint is
its last step: saving more often would cost more than these short stages).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Steps per stage, with the tiny model's own defaults (pathmil_defaults.json: lr, batch 8, 4 generations).
# Measured here (seed 0): after 40 or 150 SFT steps every held-out answer is the same letter; by 300 the
# accuracy is 0.94 (the loss falls a second time near step 150); the whole stage takes 75-85 s on 2 cores.
STEPS = {"caption": 20, "sft": 300, "grpo": 60}
TRAIN_PER_CLASS = 78        # training MCQs per class: seed 0's training slides hold 78 tumour tiles
TEST_PER_CLASS = 16         # held-out MCQs per class: accuracy is over 50/50 tumour / normal tiles
MAX_NEW_TOKENS = 64         # the tiny model's completion length (its SFT targets are 42-47 tokens)
# One phrase per class in the options: with `vlm data`'s four synonyms a class, 300 steps still end at one
# constant answer (held-out accuracy 0.25); a real model reads synonyms, a 0.4M-parameter one has to learn them.
SYNONYMS = {"normal": ["normal tissue"], "tumor": ["tumor"]}
# The tiny model learnt single-tile questions, so it is asked one about the slide's most telling tile (with
# 2 or more tiles in the prompt its answers lose the format); a real checkpoint takes a slide-level question
# over the top 8 tiles (`real_model_note`).
ASK_QUESTION = "Which tissue does this tile show?"
ASK_OPTIONS = ["normal tissue", "tumor"]
ASK_TOP_K = 1
REAL_QUESTION = "Does this slide show tumor?"
REAL_MODEL = "WenchuanZhang/Patho-R1-3B"


def real_model_note(store: Path, slide: str, run: str) -> str:
    """The sentence after the table: what the tiny model shows, and the command for real answers."""
    return (f"The tiny model only demonstrates the pipeline; real answers need a real checkpoint, e.g. "
            f".venv/bin/vlm ask --store {store} --slide {slide} --question \"{REAL_QUESTION}\" --run {run} --top-k 8 "
            f"--model {REAL_MODEL}")


def _tiny(folder: Path, seed: int) -> Path:
    """The tiny model folder, made once (its defaults file is written last: without it the folder is partial)."""
    from vlm.tiny import DEFAULTS_FILE, make_tiny

    if not (folder / DEFAULTS_FILE).is_file():
        if folder.exists():
            shutil.rmtree(folder)           # a make-tiny cut short; make_tiny refuses a non-empty folder
        make_tiny(folder, seed=seed)
    return folder


def _train(stage: str, data: Path, model: Path, run: Path, seed: int, progress: bool) -> tuple[dict, bool]:
    """(train_summary, whether it trained now): a finished run (train_summary.json) is read back, not redone."""
    from vlm.train import train

    done = run / "train_summary.json"
    if done.is_file():
        return json.loads(done.read_text()), False
    # the tiny model's own defaults (pathmil_defaults.json); only the number of steps is set
    summary = train(stage, data, model, run, max_steps=STEPS[stage], seed=seed, save_steps=STEPS[stage],
                    progress=progress)
    return summary, True


def vlm_stage(store: Path, labels_csv: Path, out: Path, *, mil_run: str, tumor_slide: str, clip_dir: Path,
              seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Make the tiny model and the cohort's caption / SFT / MCQ data, train caption -> sft -> grpo briefly,
    evaluate on the held-out slides' MCQs before and after, and ask about `tumor_slide` with its top tiles
    by the store's `mil_run` predictions. `clip_dir` holds the PathoCLIP stage's captions_train.csv and
    captions_test.csv. Returns {"rows": one per model (model, accuracy, format_rate, mean_reward,
    sampled_mean_reward, n),
    "runs": {stage: {"steps", "seconds", "trained_now"}}, "ask": `vlm.ask.ask`'s result, "data": the
    make_data summaries, "seconds"}."""
    import time

    from demo_clip import split_slides
    from vlm.ask import ask
    from vlm.data import make_data
    from vlm.evaluate import evaluate
    from wsi.runtime import atomic_write_json

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_slides, test_slides = split_slides(labels_csv, seed=seed)
    tiny = _tiny(out / "tiny", seed)
    # deterministic for a seed: rewritten identically on a rerun, so a resumed stage sees the same rows
    data = {"train": make_data(store, "tumor", clip_dir / "captions_train.csv", out / "data_train",
                               slides=train_slides, max_per_class=TRAIN_PER_CLASS, synonyms=SYNONYMS, seed=seed),
            "test": make_data(store, "tumor", clip_dir / "captions_test.csv", out / "data_test",
                              slides=test_slides, max_per_class=TEST_PER_CLASS, synonyms=SYNONYMS, seed=seed + 1)}
    train_dir, test_mcq = out / "data_train", out / "data_test" / "mcq.jsonl"

    metrics_file = out / "vlm_metrics.json"
    stored = json.loads(metrics_file.read_text()).get("metrics", {}) if metrics_file.is_file() else {}
    metrics: dict[str, dict] = {}

    def held_out(name: str, model: Path, fresh: bool) -> None:
        if name in stored and not fresh:
            metrics[name] = stored[name]
            return
        from vlm.model import load_model

        loaded = load_model(model)
        stem = out / "eval" / name.replace("+", "-")
        greedy = evaluate(loaded, test_mcq, stem.with_suffix(".json"), batch_size=16, max_new_tokens=MAX_NEW_TOKENS,
                          progress=progress)
        # GRPO learns from sampled completions: their reward shows a change that greedy answers may not.
        # Seeded: the same samples on every run.
        sampled = evaluate(loaded, test_mcq, stem.with_name(stem.name + "-sampled.json"), batch_size=16,
                           max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=seed, progress=progress)
        metrics[name] = {**greedy["metrics"], "sampled_mean_reward": sampled["metrics"]["mean_reward"],
                         "model": str(model)}

    runs: dict[str, dict] = {}
    held_out("untrained", tiny, False)
    previous = tiny
    for stage, data_file in (("caption", train_dir / "caption.jsonl"), ("sft", train_dir / "sft.jsonl"),
                             ("grpo", train_dir / "mcq.jsonl")):
        summary, now = _train(stage, data_file, previous, out / stage, seed, progress)
        runs[stage] = {"steps": summary["steps"], "seconds": summary["seconds"], "rows": summary["rows"],
                       "trained_now": now}
        if stage != "caption":
            held_out("sft" if stage == "sft" else "sft+grpo", out / stage, now)
        previous = out / stage
    atomic_write_json(metrics_file, {"metrics": metrics, "runs": runs, "test_mcq": str(test_mcq),
                                     "steps": STEPS, "seed": seed})

    answer = ask(store, tumor_slide, ASK_QUESTION, out / "grpo", run=mil_run, top_k=ASK_TOP_K, options=ASK_OPTIONS,
                 montage=out / f"ask-{tumor_slide}.png", max_new_tokens=MAX_NEW_TOKENS)
    rows = [{"model": k, **{f: metrics[k].get(f) for f in ("accuracy", "format_rate", "mean_reward",
                                                             "sampled_mean_reward", "n")}}
            for k in ("untrained", "sft", "sft+grpo")]
    return {"rows": rows, "runs": runs, "ask": answer, "data": data, "seconds": time.perf_counter() - t0}


def rows_table(rows: list[dict]) -> str:
    """The held-out table: model, accuracy, format rate, mean reward (greedy), mean reward sampled at T=1, n."""
    from wsi.cli_common import format_table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    table = [("model (tiny Qwen2.5-VL)", "accuracy", "format rate", "mean reward", "sampled reward (T=1)", "n")]
    table += [(r["model"], f(r["accuracy"]), f(r["format_rate"]), f(r["mean_reward"]), f(r["sampled_mean_reward"]),
               r["n"]) for r in rows]
    return format_table(table)


def runs_line(runs: dict[str, dict]) -> str:
    """One line: the steps and seconds of each stage, "(kept)" for the ones finished by an earlier run."""
    return "; ".join(f"{s} {r['steps']} steps {r['seconds']:.0f} s{'' if r['trained_now'] else ' (kept)'}"
                     for s, r in runs.items())
