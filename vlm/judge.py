"""PathVLM-R1's process reward: a judge model behind any OpenAI-compatible chat endpoint scores the
reasoning of each completion (standard library only: urllib, one request per completion, in threads).

Rubric (PathVLM-R1): integrity starts at 1 and loses 0.4 for each missing of image-feature analysis,
elimination of >= 2 options, cited knowledge; knowledge starts at 1 and loses 0.4 per wrong definition,
contradiction, outdated criterion. The judge replies with JSON {"integrity_score", "knowledge_score"}; the
reward is the mean of the two, each clipped to [0, 1].

Fallback, the same for unparsable replies, timeouts, HTTP and connection errors: 0.5 for each score (so
0.5) when the completion's answer is right (`rewards.accuracy_reward` == 1), else 0. A judge problem is
logged and never raised, so it cannot stop a training run.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence
from urllib.parse import urlparse

from .prompts import VlmError, format_question
from .rewards import RewardFunc, accuracy_reward, completion_text

log = logging.getLogger(__name__)

RUBRIC = """You are a senior pathologist grading the reasoning of a pathology model. Score two things.

integrity_score: start at 1.0 and subtract 0.4 for each of these that is missing:
  1. an analysis of the image features (what is seen in the image);
  2. the elimination of at least two of the wrong options (multiple-choice questions);
  3. cited pathology knowledge (definitions, criteria, typical findings) that supports the answer.
knowledge_score: start at 1.0 and subtract 0.4 for each wrong definition, each contradiction, and each
outdated diagnostic criterion in the reasoning.

Reply with JSON only, no other text: {"integrity_score": <number>, "knowledge_score": <number>}"""

_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)
KEYS = ("integrity_score", "knowledge_score")


def chat_url(judge_url: str) -> str:
    """The chat-completions URL: `judge_url` as given when it ends in /chat/completions, else with that
    appended (so a base URL such as http://host:8000/v1 works)."""
    url = judge_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_scores(content: str) -> float | None:
    """The reward from a judge's reply text: the mean of the two scores clipped to [0, 1], or None when
    the reply holds no JSON object with both scores as finite numbers (a ```json fence is fine)."""
    candidates = [content.strip()] + _OBJECT.findall(content)
    for text in candidates:
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        values = [obj.get(key) for key in KEYS]
        try:
            nums = [float(v) for v in values if not isinstance(v, bool)]
        except (TypeError, ValueError):
            continue
        if len(nums) == 2 and all(math.isfinite(v) for v in nums):
            return sum(min(max(v, 0.0), 1.0) for v in nums) / 2
    return None


def judge_prompt(completion: str, question: str, answer: str, options: Sequence[str] | None) -> str:
    """The user message the judge grades: the question (with lettered options), the reference answer and
    the model's response."""
    return (f"Question:\n{format_question(question, options)}\n\nReference answer: {answer}\n\n"
            f"Model response:\n{completion}")


def ask_judge(content: str, *, judge_url: str, judge_model: str, api_key: str | None, timeout: float) -> float | None:
    """One chat request; the parsed reward, or None for an unparsable reply. HTTP, connection and
    timeout errors raise (OSError / ValueError); `judge_reward` turns them into the fallback."""
    body = {"model": judge_model, "temperature": 0.0,
            "messages": [{"role": "system", "content": RUBRIC}, {"role": "user", "content": content}]}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(chat_url(judge_url), data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read().decode("utf-8", errors="replace"))
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return parse_scores(text) if isinstance(text, str) else None


def judge_reward(completions: Sequence[Any], *, question: Sequence[str] | str, answer: Sequence[str] | str,
                 judge_url: str, judge_model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30,
                 options: Sequence[Sequence[str] | None] | None = None, max_workers: int = 8,
                 **kw: Any) -> list[float]:
    """The process reward per completion, in [0, 1]; the fallback (module docstring) replaces any reply
    that cannot be used. `question`, `answer`, `options` are dataset columns (a single string applies to
    all); the key is read from the environment variable `api_key_env` (no key: no Authorization header)."""
    n = len(completions)
    if n == 0:
        return []
    questions = [question] * n if isinstance(question, str) else list(question)
    answers = [answer] * n if isinstance(answer, str) else list(answer)
    option_rows = [None] * n if options is None else list(options)
    right = accuracy_reward(completions, answers, option_rows)
    fallback = [0.5 if r == 1.0 else 0.0 for r in right]
    api_key = os.environ.get(api_key_env) or None
    problems: list[str] = []

    def one(i: int) -> float:
        try:
            content = judge_prompt(completion_text(completions[i]), questions[i], answers[i], option_rows[i])
            score = ask_judge(content, judge_url=judge_url, judge_model=judge_model, api_key=api_key,
                              timeout=timeout)
        except Exception as exc:   # noqa: BLE001 - any judge failure becomes the fallback, never a crash
            problems.append(f"{type(exc).__name__}: {exc}")
            return fallback[i]
        if score is None:
            problems.append("reply without JSON integrity_score/knowledge_score")
            return fallback[i]
        return score

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, n))) as pool:
        scores = list(pool.map(one, range(n)))
    if problems:
        log.warning("judge %s: %d of %d replies unusable, fallback used (first: %s)", chat_url(judge_url),
                    len(problems), n, problems[0])
    return scores


def check_endpoint(judge_url: str, judge_model: str) -> None:
    """A VlmError unless `judge_url` is an http(s) URL and `judge_model` is given (no request is sent)."""
    if urlparse(judge_url).scheme not in ("http", "https") or not urlparse(judge_url).netloc:
        raise VlmError(f"--judge-url {judge_url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    if not judge_model:
        raise VlmError("--judge-model is empty; give the model name the endpoint serves")


def make_judge_reward(judge_url: str, judge_model: str, api_key_env: str = "OPENAI_API_KEY",
                      timeout: float = 30) -> RewardFunc:
    """`judge_reward` bound to one endpoint, for trl's `reward_funcs` list (`--judge-url`, `--judge-model`)."""
    check_endpoint(judge_url, judge_model)

    def judge_reward_(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return judge_reward(completions, judge_url=judge_url, judge_model=judge_model, api_key_env=api_key_env,
                            timeout=timeout, **kwargs)

    judge_reward_.__name__ = "judge_reward"
    return judge_reward_


__all__ = ["RUBRIC", "chat_url", "parse_scores", "judge_prompt", "ask_judge", "judge_reward", "check_endpoint",
           "make_judge_reward"]
