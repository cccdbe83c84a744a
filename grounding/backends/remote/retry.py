"""When a failed request is worth sending again, how long to wait first, and what to say.

Providers disagree on how they say "busy" (429 or 503 with Retry-After, or Qianfan's
error_code bodies under HTTP 200) and on where the human message sits in an error body.
This module is that catalogue and the backoff rule, kept apart from the HTTP client so
that each rule can be read, and tested, without a server.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from grounding.core.errors import GroundingError


class RemoteError(GroundingError):
    """A request failed for good; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        self.status = status
        self.retryable = retryable
        super().__init__(message)


MAX_RETRY_AFTER = 120.0
"""Longest Retry-After honoured (seconds): a server asking for an hour stalls no image."""

RETRY_AFTER_STATUSES = frozenset({429, 503})
"""The statuses whose Retry-After header is honoured."""

_BUSY_WORDS = ("rate limit", "qps", "too many requests", "busy", "overload", "try again",
               "temporarily")
"""Words that make an error under HTTP 200 (Qianfan's error_code bodies) worth a retry."""

_STATUS_HINTS = {
    400: "bad request",
    401: "authentication failed: check the API key (--api-key-env) and --api-key-header",
    403: "access denied: check the API key and that it may use this model",
    404: "not found: check --model, --base-url and --endpoint",
    405: "method not allowed: check --base-url and --endpoint",
    406: "not acceptable (Segmind answers this when the account has not enough credits)",
    413: "request too large: lower --max-pixels",
    422: "the server rejected the request body",
    429: "rate limited",
}


def provider_message(body: Any) -> str | None:
    """The human message inside an error body, whichever provider wrote it."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except (ValueError, TypeError):
            return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):  # OpenAI, vLLM, SGLang
        message = error.get("message") or error.get("msg")
        code = error.get("code") or error.get("type")
        if message:
            return f"{message} ({code})" if code and str(code) not in str(message) else message
    if isinstance(error, str) and error:
        return error
    if body.get("error_code") not in (None, 0, "0", ""):  # Baidu Qianfan
        return f"{body.get('error_msg') or 'error'} (error_code {body['error_code']})"
    if body.get("code") and body.get("message"):  # DashScope
        return f"{body['message']} ({body['code']})"
    if body.get("object") == "error" and body.get("message"):  # older vLLM
        return str(body["message"])
    for key in ("message", "detail", "msg"):
        if isinstance(body.get(key), str) and body[key]:
            return body[key]
    return None


def says_busy(message: str | None) -> bool:
    """Whether an error message under HTTP 200 asks, in words, to come back later."""
    return message is not None and any(w in message.lower() for w in _BUSY_WORDS)


def describe_status(status: int, detail: str | None = None) -> str:
    """``HTTP 401: authentication failed: ...``, then the provider's own message."""
    hint = _STATUS_HINTS.get(status, "server error" if status >= 500 else "request failed")
    return f"HTTP {status}: {hint}: {detail}" if detail else f"HTTP {status}: {hint}"


def retryable_status(status: int) -> bool:
    """Rate limits, timeouts and server errors pass; any other 4xx is the request's fault."""
    return status == 429 or status >= 500 or status == 408


def retry_after(status: int, headers: Any) -> float | None:
    """The wait in seconds that a 429 or 503 answer asks for in its Retry-After header (a
    number of seconds or an HTTP date); None for another status, or without a readable
    header."""
    if status not in RETRY_AFTER_STATUSES:
        return None
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_retries`` retries after the first attempt; before each, the server's
    Retry-After (up to MAX_RETRY_AFTER), else exponential backoff from ``backoff`` seconds,
    at most ``max_backoff``, with jitter (half to all of it) so that clients that failed
    together do not come back together."""

    max_retries: int
    backoff: float
    max_backoff: float

    def delay(self, attempt: int, asked: float | None = None) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (0 for the first) before the
        next one, ``asked`` being what the server asked for; None when retries are spent."""
        if attempt >= self.max_retries:
            return None
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER)
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1)
