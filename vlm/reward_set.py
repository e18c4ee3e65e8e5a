"""The reward functions and weights of a grpo / dapo run, from its settings (`vlm.train.resolve_settings`).

In order: format (`rewards.make_format_reward`, pre-filled `<think>` templates detected) and accuracy
(`rewards.accuracy_reward`), weighted 0.1 / 0.9 by default (Patho-R1); then the optional process rewards,
PathoCLIP grounding (`grounding`: a PathoCLIP name or `clip train` RUN_DIR, `grounding.make_grounding_reward`)
and a judge model (`judge_url` + `judge_model`, `judge.make_judge_reward`, PathVLM-R1's rubric), each
weighted `PROCESS_WEIGHT` unless `reward_weights` lists one weight per reward; dapo adds trl's soft
overlong punishment with weight 1.

The judge's URL is never written to a run's files: `recorded_settings` puts a digest in its place.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

from .prompts import SYSTEM_PROMPT, VlmError, template_prefills_think

# A process reward (grounding, judge) counts half a right answer unless --reward-weights says otherwise.
PROCESS_WEIGHT = 0.5


def reward_names(s: Mapping[str, Any]) -> list[str]:
    """The names of the weighted rewards the settings ask for (format, accuracy[, grounding][, judge]);
    a VlmError when the judge lacks its URL or model, or `reward_weights` has neither 2 values nor one per
    reward."""
    from .rewards import check_weights

    if bool(s.get("judge_url")) != bool(s.get("judge_model")):
        raise VlmError("the judge reward needs both --judge-url and --judge-model")
    if s.get("judge_url"):
        from .judge import check_endpoint

        check_endpoint(s["judge_url"], s["judge_model"], s.get("judge_key_env") or "OPENAI_API_KEY")
    names = ["format", "accuracy"] + ["grounding"] * bool(s.get("grounding")) + ["judge"] * bool(s.get("judge_url"))
    given = list(s["reward_weights"])
    check_weights(given, len(names) if len(given) != 2 else 2,
                  f"--reward-weights {','.join(str(w) for w in given)} (one weight each for {','.join(names)})")
    return names


def recorded_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as a run's files record them: tuples as lists, and the judge URL (which may name a
    private host or carry a token) replaced by "sha256:" and the first 16 hex digits of its digest, so
    two runs can still be compared. The key itself is never in the settings (only its variable's name)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}
    if out.get("judge_url"):
        out["judge_url"] = "sha256:" + hashlib.sha256(str(out["judge_url"]).encode()).hexdigest()[:16]
    return out


def reward_functions(stage: str, processor: Any, s: Mapping[str, Any], system: str | None = SYSTEM_PROMPT,
                     device: str = "auto", rows: Sequence[Mapping[str, Any]] | None = None) -> tuple[list, list[float]]:
    """(reward functions, weights) for grpo / dapo from the settings `s`: format (pre-filled `<think>`
    templates detected) and accuracy, then the process rewards that `s` asks for (grounding, with its bank
    of negatives drawn from the training `rows`; judge), with `s["reward_weights"]` (two values: the
    process rewards get `PROCESS_WEIGHT` each); dapo adds trl's soft overlong punishment (weight 1, cache a
    fifth of the completion length, DAPO's 4k of 20k)."""
    from .rewards import accuracy_reward, make_format_reward

    names = reward_names(s)
    prefilled = template_prefills_think(processor, system)
    funcs: list = [make_format_reward(prefilled), accuracy_reward]
    if "grounding" in names:
        from .grounding import make_grounding_reward

        if rows is None:
            raise VlmError("the grounding reward draws its negatives from the training rows; pass rows")
        funcs.append(make_grounding_reward(s["grounding"], rows=rows, prefilled_think=prefilled, device=device,
                                           seed=int(s.get("seed") or 0)))
    if "judge" in names:
        from .judge import make_judge_reward

        funcs.append(make_judge_reward(s["judge_url"], s["judge_model"], s.get("judge_key_env") or "OPENAI_API_KEY",
                                       float(s.get("judge_timeout") or 30.0),
                                       text_only=bool(s.get("judge_text_only"))))
    ws = [float(w) for w in s["reward_weights"]]
    ws += [PROCESS_WEIGHT] * (len(funcs) - len(ws))
    if stage == "dapo":
        from trl.rewards import get_soft_overlong_punishment

        L = int(s["max_completion_length"])
        funcs.append(get_soft_overlong_punishment(L, max(1, L // 5)))
        ws.append(1.0)
    return funcs, ws


__all__ = ["PROCESS_WEIGHT", "reward_names", "recorded_settings", "reward_functions"]
