"""The judge's endpoint: one OpenAI-compatible chat-completions server, reached with the `openai` client
(retries with back-off, timeouts; on a redirect to another origin httpx drops the Authorization header).

What is sent where:
- the key comes from one environment variable (`api_key_env`) and nowhere else: the client is never left
  to read OPENAI_API_KEY, OPENAI_ORG_ID or OPENAI_PROJECT_ID by itself, and without a key no
  Authorization header is sent at all;
- a key goes over plain http only to a loopback host (127.0.0.0/8, ::1, localhost); credentials inside
  the URL are refused (use the environment variable);
- the URL and the key are scrubbed from every log record of this module, the openai client and httpx
  (whose INFO record of each request names the URL).

Structured output: each request asks for a JSON schema (`response_format`); a server that refuses it
(HTTP 400 / 422) is asked again without, and then never with it for the rest of the run. Images go as
OpenAI `image_url` parts with base64 PNG data URLs, at most `MAX_IMAGE_SIDE` pixels a side.
"""
from __future__ import annotations

import base64
import io
import ipaddress
import logging
import os
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from .prompts import VlmError

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 512
# Loggers that may name the URL of a request: scrubbed as long as an endpoint exists.
# (a logger's filter sees only the records made on that logger, so each module's logger is named)
_SCRUBBED_LOGGERS = ("httpx2", "httpx", "openai", "openai._base_client", "openai._response", "openai._legacy_response",
                     "httpcore2.connection", "httpcore2.connection_pool", "httpcore2.http11", "httpcore2.http2",
                     "httpcore2.proxy", "httpcore.connection", __name__, "vlm.judge")


def chat_url(judge_url: str) -> str:
    """The chat-completions URL: `judge_url` as given when it ends in /chat/completions, else with that
    appended (so a base URL such as http://host:8000/v1 works)."""
    url = judge_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def base_url(judge_url: str) -> str:
    """The base URL the openai client takes (`judge_url` without a trailing /chat/completions)."""
    return chat_url(judge_url)[: -len("/chat/completions")]


def is_loopback(host: str | None) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_endpoint(judge_url: str, judge_model: str, api_key_env: str | None = None) -> None:
    """A VlmError unless `judge_url` is an http(s) URL without credentials in it, `judge_model` is given,
    and a key (set in `api_key_env`) would not travel over plain http to another host. No request is sent;
    the messages never repeat the URL."""
    u = urlparse(judge_url or "")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise VlmError("--judge-url is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    if u.username or u.password:
        raise VlmError("--judge-url holds credentials; drop them from the URL and put the key in the variable "
                       "that --judge-key-env names")
    if not judge_model:
        raise VlmError("--judge-model is empty; give the model name the endpoint serves")
    if api_key_env and os.environ.get(api_key_env) and u.scheme == "http" and not is_loopback(u.hostname):
        raise VlmError(f"--judge-url is plain http to another host and ${api_key_env} holds a key: the key would "
                       "travel unencrypted; use https, or unset the variable for a keyless endpoint")


class _Scrub(logging.Filter):
    """Replaces the secrets (URL, host:port, key) in a record's text by '<judge>'."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def scrub(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(s, "<judge>")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            try:
                text = record.getMessage()
            except Exception:          # noqa: BLE001 - a malformed record is not this filter's business
                return True
            clean = self.scrub(text)
            if clean != text:
                record.msg, record.args = clean, ()
        return True


SCRUB = _Scrub()


def image_part(image: Any) -> dict[str, Any]:
    """An OpenAI `image_url` content part: the image (PIL, uint8 array, path or store reference) as a PNG
    data URL, downscaled to at most MAX_IMAGE_SIDE a side."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike, Mapping)):
        from .data import load_image

        image = load_image(image)
    if not hasattr(image, "convert"):
        from .grounding import to_uint8

        image = Image.fromarray(to_uint8(image))
    im = image.convert("RGB")
    im.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


class RefusedWithImages(Exception):
    """The endpoint refused a request that carried images (HTTP 400 / 422), with or without the schema."""


class JudgeEndpoint:
    """One judge endpoint: `ask(system, text, images, timeout)` -> the reply's text (or None when the reply
    has no text). Errors (HTTP, connection, timeout) raise the openai client's exceptions."""

    def __init__(self, judge_url: str, judge_model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 30.0, max_retries: int = 2, max_tokens: int = 256,
                 schema: Mapping[str, Any] | None = None) -> None:
        import openai

        check_endpoint(judge_url, judge_model, api_key_env)
        self.model = judge_model
        self.max_tokens = int(max_tokens)
        self.schema = dict(schema) if schema else None
        self.structured = self.schema is not None     # until the server refuses response_format
        key = (os.environ.get(api_key_env) or "") if api_key_env else ""
        u = urlparse(judge_url)
        for name in _SCRUBBED_LOGGERS:             # from the first endpoint on (addFilter adds it once)
            logging.getLogger(name).addFilter(SCRUB)
        SCRUB.secrets.update(s for s in (judge_url.rstrip("/"), chat_url(judge_url), base_url(judge_url), u.netloc,
                                         f"host={u.hostname!r}", key) if s)
        # explicit key and no organisation/project headers: nothing is read from OPENAI_* variables
        self._headers: dict[str, Any] = {"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()}
        if not key:
            self._headers["Authorization"] = openai.Omit()
        self._client = openai.OpenAI(base_url=base_url(judge_url), api_key=key or "unused", timeout=timeout,
                                     max_retries=max_retries)
        self._refused = (openai.BadRequestError, openai.UnprocessableEntityError)

    def _create(self, messages: list[dict], timeout: float, structured: bool) -> Any:
        extra = {"response_format": {"type": "json_schema", "json_schema": self.schema}} if structured else {}
        return self._client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                    max_tokens=self.max_tokens, timeout=timeout,
                                                    extra_headers=self._headers, **extra)

    def ask(self, system: str, text: str, images: Sequence[Any] = (), timeout: float = 30.0) -> str | None:
        """The judge's reply text to the system prompt and one user message (text, then the images)."""
        content: Any = text if not images else [{"type": "text", "text": text}, *(image_part(i) for i in images)]
        messages = [{"role": "system", "content": system}, {"role": "user", "content": content}]
        structured = self.structured
        try:
            reply = self._create(messages, timeout, structured)
        except self._refused:
            if not structured:
                raise
            try:
                reply = self._create(messages, timeout, False)     # raises again when the schema was not the cause
            except self._refused as exc:
                if images:
                    raise RefusedWithImages(f"{type(exc).__name__} ({getattr(exc, 'status_code', '?')}); an endpoint "
                                            "without image input needs --judge-text-only") from exc
                raise
            if self.structured:
                self.structured = False
                log.warning("judge: the endpoint refuses response_format (JSON schema); asking for plain JSON "
                            "for the rest of the run")
        try:
            out = reply.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return None
        return out if isinstance(out, str) else None

    def close(self) -> None:
        self._client.close()


__all__ = ["MAX_IMAGE_SIDE", "chat_url", "base_url", "is_loopback", "check_endpoint", "image_part", "RefusedWithImages",
           "JudgeEndpoint", "SCRUB"]
