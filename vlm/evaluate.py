"""`vlm eval --model M --data mcq.jsonl --out RESULT.json`: a model answers the MCQ (or open) rows of a
JSONL file with batched generation, and each answer is scored with the training rewards, so an eval
number and a GRPO reward mean the same thing.

Per item (PathMMU-style: one entry per question, with the model's raw response and the parsed answer):
    {"id", "question", "options", "answer", "response", "pred_answer", "pred_letter", "correct",
     "accuracy_score", "format_ok", "format_reason", "reward"}
- accuracy_score: `rewards.accuracy_reward` (MCQ: 1 for the right letter and consistent option text;
  open: exact match 1, else token F1); correct: accuracy_score == 1.
- format_ok: `rewards.format_reward` (exactly one <think> then one non-empty <answer>).
- reward: `rewards.combined_reward` with the run's weights (Patho-R1's 0.1 format + 0.9 accuracy).
Metrics: n, accuracy (fraction correct), format_rate, mean_reward, mean_accuracy_score.

Generation defaults to the evaluated run's own settings (`run_generation`): as many new tokens as its
GRPO / DAPO completions had (RUN_DIR/train_summary.json), else the model folder's GRPO default
(pathmil_defaults.json, else 1,024), and the run's format / accuracy reward weights; decoding is greedy
unless --temperature is given.

When the chat template pre-fills `<think>` in the generation prompt (trl #6966), completions start inside
the block; `prompts.template_prefills_think` sees that and the format check accounts for it.
"""
from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from wsi.runtime import atomic_write_json

from .prompts import SYSTEM_PROMPT, VlmError, build_messages, parse_completion, template_prefills_think
from .rewards import PATHO_R1_WEIGHTS, accuracy_reward, combined_reward, format_reward, mcq_choice

log = logging.getLogger(__name__)


def run_generation(model: Any) -> dict[str, Any]:
    """{"max_new_tokens", "reward_weights", "from"}: how the run in `model` (a folder, hub id, or a loaded
    pair whose config names its folder) generated and weighted its rewards in training. A grpo / dapo
    RUN_DIR: its train_summary.json; anything else: the GRPO settings `vlm train` would use for it
    (pathmil_defaults.json of the folder, else the defaults for real checkpoints) and Patho-R1's weights."""
    from .run_state import SUMMARY_FILE
    from .train import DEFAULTS, resolve_settings

    if isinstance(model, (tuple, list)):
        model = getattr(getattr(model[0], "config", None), "_name_or_path", None)
    folder = Path(str(model)).expanduser() if model else None
    is_dir = folder is not None and folder.is_dir()
    summary = folder / SUMMARY_FILE if is_dir else None
    if summary is not None and summary.is_file():
        s = json.loads(summary.read_text())
        settings = s.get("settings") or {}
        if s.get("stage") in ("grpo", "dapo") and settings.get("max_completion_length"):
            return {"max_new_tokens": int(settings["max_completion_length"]),
                    "reward_weights": [float(w) for w in settings.get("reward_weights", PATHO_R1_WEIGHTS)[:2]],
                    "from": str(summary)}
    tokens = resolve_settings("grpo", folder, {}) if is_dir else DEFAULTS["grpo"]
    return {"max_new_tokens": int(tokens["max_completion_length"]), "reward_weights": list(PATHO_R1_WEIGHTS),
            "from": "the grpo defaults of the model folder" if is_dir else "the grpo defaults"}


def score_completions(completions: Sequence[str], rows: Sequence[Mapping[str, Any]], *,
                      weights: Sequence[float] = PATHO_R1_WEIGHTS, prefilled_think: bool = False) -> list[dict]:
    """The per-item records (module docstring) of `completions`, one per row, in order."""
    if len(completions) != len(rows):
        raise VlmError(f"{len(completions)} completions for {len(rows)} rows; give one completion per row")
    answers = [str(r["answer"]) for r in rows]
    options = [r.get("options") or None for r in rows]
    acc = accuracy_reward(completions, answers, options)
    fmt = format_reward(completions, prefilled_think=prefilled_think)
    total = combined_reward(weights, prefilled_think=prefilled_think)(completions, answer=answers, options=options)
    items = []
    for k, (text, row) in enumerate(zip(completions, rows)):
        parsed = parse_completion(text, prefilled_think)
        letter = mcq_choice(parsed["answer"], len(options[k]))[0] if parsed["answer"] and options[k] else None
        items.append({"id": row.get("id", k), "question": row["question"], "options": options[k],
                      "answer": answers[k], "response": text, "pred_answer": parsed["answer"], "pred_letter": letter,
                      "correct": acc[k] == 1.0, "accuracy_score": acc[k], "format_ok": fmt[k] == 1.0,
                      "format_reason": parsed["reason"], "reward": total[k]})
    return items


def summarize(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """{"n", "accuracy", "format_rate", "mean_reward", "mean_accuracy_score"} over the per-item records
    (NaN for an empty list)."""
    n = len(items)

    def mean(key: str) -> float:
        return sum(float(i[key]) for i in items) / n if n else math.nan

    return {"n": n, "accuracy": mean("correct"), "format_rate": mean("format_ok"), "mean_reward": mean("reward"),
            "mean_accuracy_score": mean("accuracy_score")}


def evaluate(model: Any, data: str | Path | Sequence[Mapping[str, Any]], out: str | Path | None = None, *,
             batch_size: int = 8, max_new_tokens: int | None = None, temperature: float = 0.0,
             system: str | None = SYSTEM_PROMPT, weights: Sequence[float] | None = None,
             limit: int | None = None, seed: int | None = 0, device: str = "auto",
             progress: bool = True, data_root: str | Path | None = None, allow_remote: bool = False) -> dict[str, Any]:
    """Answer every row of `data` and score it; write RESULT.json to `out` when given.

    model: a model folder or hub id (`model.load_model`), or a loaded (model, processor) pair. data: an
    eval JSONL file (`data.read_jsonl(path, "eval", data_root=, allow_remote=)`: bad lines skipped and
    reported) or rows already read (images absolute or store references). max_new_tokens / weights None:
    the run's own (`run_generation`). Generation is batched (`model.generate`, left-padded), greedy at
    temperature 0; sampled at temperature > 0 from torch's generator seeded with `seed` (None: not
    seeded). Returns {"model", "data", "config", "metrics", "items", "created"}."""
    import torch
    from tqdm.auto import tqdm

    from .data import load_images, read_jsonl
    from .model import generate, load_model

    if batch_size < 1:
        raise VlmError(f"--batch-size {batch_size}: give a number >= 1")
    own = run_generation(model)
    max_new_tokens = int(own["max_new_tokens"] if max_new_tokens is None else max_new_tokens)
    weights = own["reward_weights"] if weights is None else list(weights)
    if max_new_tokens < 1:
        raise VlmError(f"--max-new-tokens {max_new_tokens}: give a number >= 1")
    source = None
    if isinstance(data, (str, Path)):
        rows_read = read_jsonl(data, "eval", data_root=data_root, allow_remote=allow_remote)
        source, rows, dropped = str(data), list(rows_read.rows), rows_read.dropped
        base = Path(data).parent
    else:
        rows, dropped, base = [dict(r) for r in data], [], None
    if limit is not None:
        rows = rows[:max(0, int(limit))]
    if isinstance(model, (tuple, list)):
        net, processor = model
        name = getattr(getattr(net, "config", None), "_name_or_path", None) or type(net).__name__
    else:
        net, processor = load_model(model, device=device)
        name = str(model)
    prefilled = template_prefills_think(processor, system)
    if temperature > 0 and seed is not None:
        torch.manual_seed(int(seed))
    completions: list[str] = []
    with tqdm(total=len(rows), desc="vlm eval", unit="q", disable=not progress, leave=False) as bar:
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            images = [load_images(r.get("images") or [], base) for r in batch]
            messages = [build_messages(r, len(imgs), system) for r, imgs in zip(batch, images)]
            completions += generate(net, processor, messages, images, max_new_tokens=max_new_tokens,
                                    temperature=temperature)
            bar.update(len(batch))
    items = score_completions(completions, rows, weights=weights, prefilled_think=prefilled)
    for k, row in enumerate(rows):
        items[k]["images"] = row.get("images") or []
    result = {"model": name, "data": {"file": source, "n": len(rows), "dropped_lines": [list(d) for d in dropped]},
              "config": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "seed": seed, "system": system, "reward_weights": list(weights), "prefilled_think": prefilled,
                         "run_settings_from": own["from"]},
              "metrics": summarize(items), "items": items,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    m = result["metrics"]
    log.info("%s on %s: accuracy %.3f, format rate %.3f, mean reward %.3f (%d questions)", name, source or "rows",
             m["accuracy"], m["format_rate"], m["mean_reward"], m["n"])
    return result


__all__ = ["run_generation", "score_completions", "summarize", "evaluate"]
