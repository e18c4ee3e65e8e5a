"""The one prompt builder of the reasoner: caption (its own mode), sft (MCQ rows), grpo, dapo, eval and ask
all call it, so a model is trained and asked with the same system prompt and the same question layout (a tiny
model trained on one prompt and evaluated on another copies the tags instead of answering).

Rows (JSONL): `{"images": [...], "question": "...", "options": ["...", ...], "answer": "B"}`;
open questions have no options and `answer` is the text; SFT rows add `"reasoning"`.

The answer of an MCQ row may be written "B", "b", "(B)", "B." or as the exact text of one option; it is
resolved to one letter by `answer_letter`. The SFT target answers with the letter AND the option text,
"B. Adenocarcinoma": PathVLM-R1 scores accuracy on both, the text makes `vlm ask` readable, and
`rewards.accuracy_reward` accepts the letter alone too (`sft_target(row, with_text=False)` gives "B").
"""
from __future__ import annotations

import re
import string
from typing import Any, Mapping, Sequence

from wsi.errors import PathmilError

SYSTEM_PROMPT = ("You are a pathology expert, your task is to answer question step by step. Use the following "
                 "format: <think> Your step-by-step reasoning </think><answer> Your final answer </answer>")
# The caption stage: plain descriptions, under a system prompt that asks for no tags (training captions under
# SYSTEM_PROMPT would teach the model that the <think>/<answer> format it demands can be ignored).
CAPTION_SYSTEM_PROMPT = "You are a pathology expert, your task is to describe the tissue in the image in plain words."
CAPTION_QUESTION = "Describe this tile."
MODES = ("reason", "caption")
LETTERS = string.ascii_uppercase

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_STRICT = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)
_LETTER_ALONE = re.compile(r"^[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:]?$")


class VlmError(PathmilError, ValueError):
    """A reasoner data row, prompt or reward setting that cannot be used."""


def format_question(question: str, options: Sequence[str] | None = None) -> str:
    """The question, then one line per option lettered "A. ...", "B. ..." (none for open questions)."""
    question = str(question).strip()
    if not options:
        return question
    if len(options) > len(LETTERS):
        raise VlmError(f"a question has {len(options)} options; at most {len(LETTERS)} (A-Z) can be lettered")
    lines = [f"{LETTERS[i]}. {str(opt).strip()}" for i, opt in enumerate(options)]
    return question + "\n" + "\n".join(lines)


def build_messages(row: Mapping[str, Any], n_images: int, system: str | None = SYSTEM_PROMPT, *,
                   mode: str = "reason") -> list[dict]:
    """trl's conversational prompt for a vision-language model: a system turn (left out when `system` is
    None or empty) and a user turn whose content is `n_images` {"type": "image"} entries, then the question
    as {"type": "text"}. The images themselves travel in the row's `images` column, in the same order.

    mode "reason" (every stage but caption): the question (and options) of `row` under `system`.
    mode "caption": a plain description: the system turn is `CAPTION_SYSTEM_PROMPT` (no <think>/<answer>
    demanded; `system` None or empty still leaves it out) and the question defaults to `CAPTION_QUESTION`."""
    if mode not in MODES:
        raise VlmError(f"prompt mode {mode!r}: give one of {', '.join(MODES)}")
    if mode == "caption":
        row = {"question": CAPTION_QUESTION, **{k: v for k, v in row.items() if v}}
        system = CAPTION_SYSTEM_PROMPT if system else None
    if "question" not in row or not str(row["question"]).strip():
        raise VlmError("a row has no 'question'; MCQ and open rows need {\"question\": ..., \"answer\": ...}")
    if n_images < 0:
        raise VlmError(f"n_images must be >= 0, not {n_images}")
    user = [{"type": "image"} for _ in range(n_images)]
    user.append({"type": "text", "text": format_question(row["question"], row.get("options"))})
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": user})
    return messages


def template_prefills_think(processor: Any, system: str | None = SYSTEM_PROMPT) -> bool:
    """True when the processor's chat template ends the generation prompt with `<think>` (trl #6966): the
    completions then start inside the block, and the format check must account for it."""
    msgs = build_messages({"question": "?"}, 0, system)
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return str(text).rstrip().endswith(THINK_OPEN)


def letter_of(text: str, n_options: int) -> str | None:
    """The letter when `text` is a letter alone ("B", "b", "(B)", "B.", "[b]"), within the first `n_options`
    letters; else None."""
    m = _LETTER_ALONE.match(str(text).strip())
    if m is None:
        return None
    letter = m.group(1).upper()
    return letter if LETTERS.index(letter) < n_options else None


def answer_letter(row: Mapping[str, Any]) -> str:
    """The correct letter of an MCQ row: `answer` given as a letter (any case, "(B)", "B.") or as the exact
    text of one option (compared after `normalize_text`)."""
    options = row.get("options") or []
    answer = str(row.get("answer", "")).strip()
    letter = letter_of(answer, len(options))
    if letter is not None:
        return letter
    hits = [i for i, opt in enumerate(options) if normalize_text(str(opt)) == normalize_text(answer)]
    if len(hits) == 1:
        return LETTERS[hits[0]]
    raise VlmError(f"answer {answer!r} is not one of the letters A-{LETTERS[max(len(options), 1) - 1]} or the text "
                   f"of exactly one option; write the answer as the option's letter")


def sft_target(row: Mapping[str, Any], with_text: bool = True) -> str:
    """`<think>{reasoning}</think><answer>{answer}</answer>` for an MCQ or open row with "reasoning". MCQ
    answers are "B. option text" (`with_text=False`: "B"); open answers are the answer text."""
    reasoning = str(row.get("reasoning") or "").strip()
    if not reasoning:
        raise VlmError("an SFT row has no 'reasoning'; add it, or give the row as {\"messages\": [...]}")
    options = row.get("options")
    if options:
        letter = answer_letter(row)
        answer = f"{letter}. {str(options[LETTERS.index(letter)]).strip()}" if with_text else letter
    else:
        answer = str(row.get("answer") or "").strip()
        if not answer:
            raise VlmError("an SFT row has no 'answer'; open questions need the answer text")
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def parse_completion(text: str, prefilled_think: bool = False) -> dict[str, Any]:
    """Split a completion into {"think", "answer", "well_formed", "reason"}.

    Well formed = after stripping outer whitespace, exactly `<think>T</think>` then (whitespace allowed)
    exactly `<answer>A</answer>` and nothing else, each tag once, T and A not blank. `prefilled_think`: the
    chat template already wrote `<think>` into the prompt (trl #6966), so the completion starts inside the
    block; a completion that repeats the opening tag is accepted too.

    "answer" is the stripped text of the single <answer> block whenever there is exactly one (even if
    the rest is malformed), else None; "think" likewise. "reason" says why it is not well formed ("ok"
    when it is)."""
    text = str(text).strip()
    if prefilled_think and not text.startswith(THINK_OPEN):
        text = THINK_OPEN + text
    counts = {tag: text.count(tag) for tag in _TAGS}
    think = _block(text, THINK_OPEN, THINK_CLOSE, counts)
    answer = _block(text, ANSWER_OPEN, ANSWER_CLOSE, counts)
    reason = "ok"
    if counts[ANSWER_OPEN] > 1 or counts[ANSWER_CLOSE] > 1:
        reason = "several <answer> blocks"
    elif counts[THINK_OPEN] > 1 or counts[THINK_CLOSE] > 1:
        reason = "several <think> blocks"
    elif answer is None:
        reason = "no <answer>...</answer> block"
    elif think is None:
        reason = "no <think>...</think> block"
    elif not answer:
        reason = "empty answer"
    elif not think:
        reason = "empty reasoning"
    elif _STRICT.fullmatch(text) is None:
        reason = "text outside the blocks or blocks out of order"
    return {"think": think, "answer": answer, "well_formed": reason == "ok", "reason": reason}


def _block(text: str, open_tag: str, close_tag: str, counts: Mapping[str, int]) -> str | None:
    """The stripped inside of the one open...close block, or None unless each tag occurs once, in order."""
    if counts[open_tag] != 1 or counts[close_tag] != 1:
        return None
    start, end = text.index(open_tag) + len(open_tag), text.index(close_tag)
    return text[start:end].strip() if start <= end else None


def normalize_text(text: str) -> str:
    """SQuAD's answer normalisation: lower case, punctuation and the articles a/an/the removed, whitespace
    collapsed."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


__all__ = ["SYSTEM_PROMPT", "CAPTION_SYSTEM_PROMPT", "CAPTION_QUESTION", "MODES", "LETTERS", "VlmError",
           "format_question", "build_messages", "template_prefills_think", "letter_of", "answer_letter", "sft_target",
           "parse_completion", "normalize_text"]
