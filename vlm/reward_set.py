"""The reward functions and weights of a grpo / dapo run, from its settings (`vlm.train.resolve_settings`).

In order: format (`rewards.make_format_reward`, pre-filled `<think>` templates detected) and accuracy
(`rewards.accuracy_reward`), weighted 0.1 / 0.9 by default (Patho-R1); then the optional process rewards,
PathoCLIP grounding (`grounding`: a PathoCLIP name or `clip train` RUN_DIR, `grounding.make_grounding_reward`)
and a judge model (`judge_url` + `judge_model`, `judge.make_judge_reward`, PathVLM-R1's rubric), each
weighted `PROCESS_WEIGHT` unless `reward_weights` lists one weight per reward; dapo adds trl's soft
overlong punishment with weight 1.
"""
from __future__ import annotations

from typing import Any, Mapping

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

        check_endpoint(s["judge_url"], s["judge_model"])
    names = ["format", "accuracy"] + ["grounding"] * bool(s.get("grounding")) + ["judge"] * bool(s.get("judge_url"))
    given = list(s["reward_weights"])
    check_weights(given, len(names) if len(given) != 2 else 2,
                  f"--reward-weights {','.join(str(w) for w in given)} (one weight each for {','.join(names)})")
    return names


def reward_functions(stage: str, processor: Any, s: Mapping[str, Any], system: str | None = SYSTEM_PROMPT,
                     device: str = "auto") -> tuple[list, list[float]]:
    """(reward functions, weights) for grpo / dapo from the settings `s`: format (pre-filled `<think>`
    templates detected) and accuracy, then the process rewards that `s` asks for (grounding, judge), with
    `s["reward_weights"]` (two values: the process rewards get `PROCESS_WEIGHT` each); dapo adds trl's soft
    overlong punishment (weight 1, cache a fifth of the completion length, DAPO's 4k of 20k)."""
    from .rewards import accuracy_reward, make_format_reward

    names = reward_names(s)
    prefilled = template_prefills_think(processor, system)
    funcs: list = [make_format_reward(prefilled), accuracy_reward]
    if "grounding" in names:
        from .grounding import make_grounding_reward

        funcs.append(make_grounding_reward(s["grounding"], prefilled_think=prefilled, device=device))
    if "judge" in names:
        from .judge import make_judge_reward

        funcs.append(make_judge_reward(s["judge_url"], s["judge_model"], s.get("judge_key_env") or "OPENAI_API_KEY",
                                       float(s.get("judge_timeout") or 30.0)))
    ws = [float(w) for w in s["reward_weights"]]
    ws += [PROCESS_WEIGHT] * (len(funcs) - len(ws))
    if stage == "dapo":
        from trl.rewards import get_soft_overlong_punishment

        L = int(s["max_completion_length"])
        funcs.append(get_soft_overlong_punishment(L, max(1, L // 5)))
        ws.append(1.0)
    return funcs, ws


__all__ = ["PROCESS_WEIGHT", "reward_names", "reward_functions"]
