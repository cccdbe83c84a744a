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
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from grounding.core.errors import GroundingError


class RemoteError(GroundingError):
    """A request failed for good.

    ``status``: the HTTP status when the server answered, else None. ``retryable``: the
    kind of failure that may pass by itself (429, 5xx, timeouts, dropped or refused
    connections, a body that is not JSON), so the same request may succeed later;
    False for what the request itself caused (other 4xx, a malformed answer).
    ``connection``: no connection to the server could be made at all (refused, host
    not found, connect timeout): nothing listens at ``--base-url``, so every other
    request will fail the same way (``status`` is then None and ``retryable`` True).
    """

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 connection: bool = False):
        self.status = status
        self.retryable = retryable
        self.connection = connection
        super().__init__(message)


CONNECT_RETRIES = 2
"""At most this many retries when no connection could be made (refused, host not found):
a server that is down or a mistyped URL does not come back within a backoff, so such an
image fails in well under a second instead of after the whole backoff (about 15 s)."""

CONNECT_BACKOFF = 0.1
"""Seconds before the first retry of a failed connection (doubling, with jitter)."""

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


CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key",
                                "api-key", "cookie"})
"""Headers whose values are credentials, besides any whose name holds a CREDENTIAL_WORDS."""

CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "password", "session", "signature")

MIN_SECRET = 4
"""Shorter header values are not scrubbed (a "Bearer" scheme word, an "on" flag): each
occurrence of them in any message would be starred, to no use."""


def credentials(headers: Any, key: str | None = None) -> list[str]:
    """The strings to keep out of every message: the API key, and the value of each
    credential-like header (by name: CREDENTIAL_HEADERS, or holding one of
    CREDENTIAL_WORDS), also without its scheme (``Bearer abc`` -> ``abc`` too), longest
    first so that no part of a longer one is left behind."""
    found = {key} if key else set()
    for name, value in dict(headers or {}).items():
        lowered = str(name).lower()
        if lowered not in CREDENTIAL_HEADERS and not any(w in lowered for w in CREDENTIAL_WORDS):
            continue
        value = str(value).strip()
        found.add(value)
        scheme, _, rest = value.partition(" ")
        if rest.strip() and scheme.isalpha():
            found.add(rest.strip())
    return sorted((v for v in found if v == key or len(v) >= MIN_SECRET), key=len,
                  reverse=True)


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

    def delay(self, attempt: int, asked: float | None = None,
              connection: bool = False) -> float | None:
        """Seconds to wait after failed attempt ``attempt`` (0 for the first) before the
        next one, ``asked`` being what the server asked for; None when retries are spent.
        A failed ``connection`` gets at most CONNECT_RETRIES quick retries."""
        if connection:
            if attempt >= min(self.max_retries, CONNECT_RETRIES):
                return None
            base = min(self.backoff, CONNECT_BACKOFF)
            return min(self.max_backoff, base * 2**attempt) * random.uniform(0.5, 1)
        if attempt >= self.max_retries:
            return None
        if asked is not None:
            return min(asked, MAX_RETRY_AFTER)
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, outermost first (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def origin(url: str) -> str:
    """``scheme://host:port`` of a URL (the port spelled out: the default one too)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = {"http": 80, "https": 443}.get(parts.scheme)
    host = parts.hostname or parts.netloc
    if host and ":" in host:  # IPv6
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port}" if port else f"{parts.scheme}://{host}"


def transport_failure(exc: BaseException, url: str, timeout: float | None = None
                      ) -> tuple[str, bool]:
    """(what happened, whether no connection could be made) for an exception the HTTP
    client raised without an answer, read from its cause chain: the openai SDK over
    aiohttp reports a refused connection as ``APITimeoutError("Request timed out.")``
    raised from ``ConnectTimeout("Cannot connect to host ...")`` raised from aiohttp's
    ``ClientConnectorError`` (over httpx: ``APIConnectionError`` from ``ConnectError``),
    and a server that hung up as a ConnectTimeout too; only the chain tells them apart.

    The message names the server (``cannot connect to http://127.0.0.1:8000: connection
    refused``) and never the request."""
    where = origin(url)
    chain = list(_causes(exc))
    names = {type(e).__name__ for e in chain}
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return f"cannot connect to {where}: connection refused", True
        if isinstance(e, socket.gaierror):
            reason = e.strerror or str(e)
            return f"cannot connect to {where}: host not found ({reason})", True
    if names & {"ClientConnectorError", "ClientConnectorDNSError", "ConnectError",
                "ClientConnectorSSLError", "ClientConnectorCertificateError"}:
        detail = next((str(e) for e in reversed(chain) if str(e)), type(exc).__name__)
        return f"cannot connect to {where}: {detail}", True
    # over aiohttp every aiohttp connection error arrives as httpx's ConnectTimeout: there
    # only aiohttp's own exception below it tells (ConnectionTimeoutError: connecting)
    over_aiohttp = any(type(e).__module__.startswith("aiohttp") for e in chain)
    if "ConnectionTimeoutError" in names or ("ConnectTimeout" in names and not over_aiohttp):
        after = f" after {timeout:g} s" if timeout else ""
        return f"cannot connect to {where}: no answer to the connection{after}", True
    if names & {"ServerDisconnectedError", "RemoteProtocolError", "ClientPayloadError",
                "ClientOSError", "ConnectionResetError", "ReadError"} or any(
            isinstance(e, ConnectionError) for e in chain):
        detail = str(chain[-1]) or type(chain[-1]).__name__
        return f"connection to {where} dropped: {detail}", False
    if names & {"APITimeoutError", "ReadTimeout", "SocketTimeoutError", "TimeoutException",
                "TimeoutError", "WriteTimeout", "PoolTimeout"}:
        after = f" after {timeout:g} s" if timeout else ""
        return f"no answer from {where}{after} (timed out)", False
    detail = str(chain[-1]) or type(chain[-1]).__name__
    return f"connection to {where} failed: {detail}", False
