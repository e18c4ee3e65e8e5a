"""Rewards for GRPO / DAPO in trl's signature, `f(completions, **kwargs) -> list[float]`: completions are
strings or conversational lists `[{"role": "assistant", "content": "..."}]`; the ground truth arrives as
dataset-column kwargs (`answer`, `options`), one value per completion.

- `format_reward`: 1.0 only for `<think>T</think><answer>A</answer>` and nothing else (see
  `prompts.parse_completion`); `make_format_reward(prefilled_think=True)` for chat templates that pre-fill
  `<think>` (trl #6966). Repeated blocks (open-r1 #418) and an empty answer (Visual-RFT #176) score 0.
- `accuracy_reward`: needs exactly one non-empty <answer> block (else 0). MCQ (row has options): 1.0 only
  when the answer names the right letter and, if it also gives option text, that text is the letter's
  option (after `prompts.normalize_text`). Accepted spellings of "B": "B", "b", "(B)", "[B]", "B.", "B)",
  "B:", "B - ", then optional option text ("B. Adenocarcinoma"), after an optional lead-in "Answer:",
  "The answer is", "The correct answer is", "Final answer:", "Option", "Choice" (any case) and markdown
  bold. Text after the letter needs one of those separators, so "B and C", "B, C", "B/C" or option text
  alone (no letter) score 0. Open questions (no options): 1.0 for a normalised exact match, else SQuAD's
  token F1 between the normalised answer and the reference.
- `combined_reward(weights=(0.1, 0.9))`: Patho-R1's 0.1 format + 0.9 accuracy as one function;
  `parse_reward_weights` reads `--reward-weights 0.1,0.9`.
- DAPO's overlong penalty is not reimplemented here: dapo takes `trl.rewards.get_soft_overlong_punishment(
  max_completion_len, soft_punish_cache)` from trl and adds it to this list of reward functions.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Sequence

from .prompts import LETTERS, VlmError, answer_letter, normalize_text, parse_completion

RewardFunc = Callable[..., list[float]]
PATHO_R1_WEIGHTS = (0.1, 0.9)

_LEAD_IN = re.compile(r"^(?:the\s+)?(?:(?:final|correct)\s+)?(?:answer|option|choice)\b\s*(?:is\b)?\s*[:\-]?\s*",
                      re.IGNORECASE)
_CHOICE = re.compile(r"^(?:[(\[]\s*([A-Za-z])\s*[)\]]|([A-Za-z])(?=$|\s*[.:)\-]))\s*[.:)\-]?\s*(.*)$", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, a message dict, or a list of messages (contents joined);
    a content may itself be a list of {"type": "text", "text": ...} parts."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, str):
            return content
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "".join(completion_text(message) for message in completion)


def format_reward(completions: Sequence[Any], prefilled_think: bool = False, **kwargs: Any) -> list[float]:
    """1.0 per well-formed completion (`prompts.parse_completion`), else 0.0."""
    return [float(parse_completion(completion_text(c), prefilled_think)["well_formed"]) for c in completions]


def make_format_reward(prefilled_think: bool) -> RewardFunc:
    """`format_reward` with `prefilled_think` fixed, for trl's `reward_funcs` list."""
    def format_reward_(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return format_reward(completions, prefilled_think=prefilled_think)

    format_reward_.__name__ = "format_reward"   # trl logs each reward under its function's name
    return format_reward_


def mcq_choice(answer: str, n_options: int) -> tuple[str | None, str]:
    """(letter, option text given after it) read from an <answer> text, or (None, "") when no single letter
    within the first `n_options` can be read (see the module docstring for the accepted spellings)."""
    text = answer.strip().strip("*").strip()
    text = _LEAD_IN.sub("", text, count=1).strip().strip("*").strip()
    m = _CHOICE.match(text)
    if m is None:
        return None, ""
    letter = (m.group(1) or m.group(2)).upper()
    if LETTERS.index(letter) >= n_options:
        return None, ""
    return letter, m.group(3).strip()


def mcq_score(answer: str, options: Sequence[str], correct: str) -> float:
    """1.0 when `answer` names letter `correct` and any option text given is that letter's option."""
    letter, text = mcq_choice(answer, len(options))
    if letter != correct:
        return 0.0
    if text and normalize_text(text) != normalize_text(str(options[LETTERS.index(letter)])):
        return 0.0
    return 1.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between the normalised texts (0.0 when either is empty)."""
    pred, ref = normalize_text(prediction).split(), normalize_text(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def open_score(answer: str, reference: str) -> float:
    """1.0 for a normalised exact match, else the token F1."""
    if normalize_text(answer) and normalize_text(answer) == normalize_text(reference):
        return 1.0
    return token_f1(answer, reference)


def accuracy_reward(completions: Sequence[Any], answer: Sequence[str] | str,
                    options: Sequence[Sequence[str] | None] | None = None, **kwargs: Any) -> list[float]:
    """Per completion: the MCQ score (row with options) or the open-question score (row without), 0.0
    unless the completion has exactly one non-empty <answer> block. `answer` and `options` are dataset
    columns (one value per completion); a single `answer` string applies to all."""
    n = len(completions)
    answers = [answer] * n if isinstance(answer, str) else list(answer)
    option_rows = [None] * n if options is None else list(options)
    if len(answers) != n or len(option_rows) != n:
        raise VlmError(f"accuracy_reward got {n} completions but {len(answers)} answers and {len(option_rows)} "
                       f"option lists; pass the dataset columns as they are")
    scores = []
    for completion, reference, opts in zip(completions, answers, option_rows):
        given = parse_completion(completion_text(completion))["answer"]
        if not given:
            scores.append(0.0)
        elif opts:
            scores.append(mcq_score(given, opts, answer_letter({"answer": reference, "options": opts})))
        else:
            scores.append(open_score(given, str(reference)))
    return scores


def combined_reward(weights: Sequence[float] = PATHO_R1_WEIGHTS, prefilled_think: bool = False) -> RewardFunc:
    """One reward function: weights[0] * format + weights[1] * accuracy (Patho-R1: 0.1, 0.9)."""
    w_format, w_accuracy = check_weights(weights, 2, "combined_reward weights")

    def combined_reward_(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        fmt = format_reward(completions, prefilled_think=prefilled_think)
        acc = accuracy_reward(completions, **kwargs)
        return [w_format * f + w_accuracy * a for f, a in zip(fmt, acc)]

    combined_reward_.__name__ = "combined_reward"
    return combined_reward_


def parse_reward_weights(text: str, n: int | None = 2) -> tuple[float, ...]:
    """`--reward-weights "0.1,0.9"` (commas or spaces) -> (0.1, 0.9): `n` (None: any number of) finite,
    non-negative numbers, not all zero, in the order of the reward functions (format, accuracy[, process])."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    return check_weights(values, len(values) or 2 if n is None else n, f"--reward-weights {text!r}")


def check_weights(values: Sequence[float], n: int, what: str) -> tuple[float, ...]:
    """`values` as a tuple when there are `n` of them, finite, non-negative and not all zero; else a
    VlmError that starts with `what` and shows an example."""
    values = tuple(float(v) for v in values)
    if len(values) != n or not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        example = ",".join(str(w) for w in (PATHO_R1_WEIGHTS + (0.5,) * n)[:n])
        raise VlmError(f"{what}: give {n} non-negative numbers, not all zero, separated by commas, e.g. {example}")
    return values


__all__ = ["PATHO_R1_WEIGHTS", "completion_text", "format_reward", "make_format_reward", "mcq_choice",
           "mcq_score", "token_f1", "open_score", "accuracy_reward", "combined_reward", "parse_reward_weights",
           "check_weights"]
