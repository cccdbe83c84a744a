"""Any OpenAI-compatible chat-completions server: vLLM, SGLang, hosted Qwen-VL / DeepSeek-VL2.

Exact coordinates: a server resizes images its own way and does not say how (vLLM with
its processor's pixel limits, hosted APIs with their own, per-request pixel hints are
often ignored). So the client sends an image that is already in the dialect's model frame
(upright, resized with the same rule under grounding's pixel budget): the server's own
resize leaves such an image as it is, and boxes map back from the frame that was sent.
Relative dialects (Qwen2-VL, Qwen3-VL, DeepSeek-VL2) are exact whatever the server does.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any

from PIL import Image

from grounding.backends.base import TOP_LOGPROBS, Generation, Request
from grounding.core.dialects import Dialect, get_dialect, guess_dialect
from grounding.core.errors import GroundingError
from grounding.core.geometry import Size, model_frame, resolve_budget

log = logging.getLogger("grounding")

TRUNCATED_REASONS = frozenset({"length", "max_tokens", "max_length", "model_length"})
"""finish_reason values meaning "cut off"; anything else ("stop", Qianfan's "normal",
"eos", None) is a finished answer."""

ENCODE_THREADS = 2
"""Threads resizing and encoding images beside the event loop."""

REFERENCE_CACHE = 16
"""Reference images whose data URLs are kept (see OpenAIBackend._reference_url)."""

CLIENT_CONNECTIONS = 8
"""Requests in flight per HTTP client (see OpenAIBackend._client)."""

JPEG_QUALITY = 95
"""Quality of the JPEG the client sends (the default format): visually lossless, and the
coordinates do not depend on it; ``image_format="png"`` sends the frame losslessly."""


def _http_client(timeout: float) -> Any:
    """The SDK over aiohttp (``openai[aiohttp]``) when installed, else None (its httpx): the
    SDK's own transport costs about 60% more CPU per request (bench/remote.py)."""
    import openai

    try:
        return openai.DefaultAioHttpClient(timeout=timeout)
    except (AttributeError, RuntimeError):  # an older openai, or aiohttp not installed
        return None


def _encoder_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Few threads: the compressor runs beside the loop; more would contend for the GIL."""
    return concurrent.futures.ThreadPoolExecutor(ENCODE_THREADS, "grounding-encode")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (``pip install uvloop``): the event loop is the client's serial
    path, and uvloop's costs less CPU per request (bench/remote.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _shutdown(loop: asyncio.AbstractEventLoop, clients: list[Any]) -> None:
    """Close ``clients`` on ``loop``, then stop it (an open aiohttp session warns when it
    is collected)."""
    if loop.is_closed() or not loop.is_running():  # nothing left that could close them
        return

    async def close_all() -> None:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        clients.clear()

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:  # collected on the loop's own thread: cannot wait for it here
        loop.create_task(close_all()).add_done_callback(lambda _: loop.stop())
        return
    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(close_all(), loop).result(timeout=10)
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(loop.stop)


class RemoteError(GroundingError):
    """A request failed for good; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        self.status = status
        self.retryable = retryable
        super().__init__(message)


MAX_RETRY_AFTER = 120.0
"""Longest Retry-After honoured (seconds): a server asking for an hour stalls no image."""

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


def _retry_after(headers: Any) -> float | None:
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


def _encode(image: Image.Image, frame: Size, image_format: str) -> str:
    if image.size != frame:
        image = image.resize(frame, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/{image_format};base64,{data}"


def json_schema(task: str) -> dict[str, Any]:
    """A response_format that makes a guided-decoding server (vLLM) write valid box JSON."""
    key, n = ("point_2d", 2) if task == "points" else ("bbox_2d", 4)
    item = {
        "type": "object",
        "properties": {
            key: {"type": "array", "items": {"type": "number"}, "minItems": n, "maxItems": n},
            "label": {"type": "string"},
        },
        "required": [key, "label"],
    }
    return {"type": "json_schema",
            "json_schema": {"name": "grounding", "schema": {"type": "array", "items": item}}}


class _OrderedGate:
    """At most ``limit`` holders, admitted strictly in ticket order (tickets are handed
    out in input order) whatever order the holders become ready in. Only the holder
    whose turn comes is woken, so the cost per request does not grow with the queue."""

    def __init__(self, limit: int) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._issued = 0
        self._next = 0
        self._waiters: dict[int, asyncio.Future] = {}
        self._skipped: set[int] = set()

    def ticket(self) -> int:
        self._issued += 1
        return self._issued - 1

    def _advance(self) -> None:
        self._next += 1
        while self._next in self._skipped:
            self._skipped.discard(self._next)
            self._next += 1
        waiter = self._waiters.pop(self._next, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def skip(self, ticket: int) -> None:
        if ticket == self._next:
            self._advance()
        else:
            self._skipped.add(ticket)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: int):
        if ticket != self._next:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[ticket] = waiter
            await waiter
        await self._slots.acquire()
        self._advance()
        try:
            yield
        finally:
            self._slots.release()


class OpenAIBackend:
    """Requests to a chat-completions server, ``concurrency`` in flight, in input order.

    The API key is read from the environment variable ``api_key_env`` (never a value on
    the command line) and sent as ``Authorization: Bearer KEY``, or bare in
    ``api_key_header`` (Segmind: ``x-api-key``). ``endpoint`` is the path under
    ``base_url`` (or a full URL) that takes the chat request. Without ``model`` the
    first one the server lists is used; without ``dialect`` it is guessed from the model
    name (an unknown name is an error, not a guess).
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str,
        dialect: str | Dialect | None = None,
        api_key_env: str | None = None,
        api_key_header: str = "Authorization",
        headers: dict[str, str] | None = None,
        endpoint: str = "/chat/completions",
        timeout: float = 120.0,
        concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_new_tokens: int = 2048,
        token_param: str = "max_tokens",
        logprobs: bool = True,
        json_schema: bool = False,
        image_format: str = "jpeg",
        text_first: bool = False,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        import openai  # noqa: F401 - fail at construction, not at the first request

        self.base_url = base_url.rstrip("/")
        self.endpoint = endpoint
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RemoteError(f"environment variable {api_key_env} is not set: export "
                                  "the API key there (it is never taken on the command line)")
        else:
            key = None
        self._key = key
        self._headers = dict(headers or {})
        if key and api_key_header.lower() != "authorization":
            self._headers[api_key_header] = key
        self._auth_in_bearer = bool(key) and api_key_header.lower() == "authorization"
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_new_tokens = max_new_tokens
        if token_param not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("token_param must be max_tokens or max_completion_tokens")
        self.token_param = token_param
        self.logprobs = logprobs
        self.json_schema = json_schema
        if image_format not in ("png", "jpeg"):
            raise ValueError("image_format must be png or jpeg")
        self.image_format = image_format
        self.text_first = text_first
        """Put the text before the images in the message (Qianfan's examples do)."""
        self._references: OrderedDict[int, tuple[Image.Image, str]] = OrderedDict()
        self._references_lock = threading.Lock()
        self.extra_body = dict(extra_body or {})
        self._clients: dict[int, list[Any]] = {}
        self._encoder = _encoder_pool()
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self.model = model or self._run(self._first_model())
        if dialect is None:
            dialect = guess_dialect(self.model)
            if dialect is None:
                raise RemoteError(f"cannot tell how model {self.model!r} writes boxes: pass "
                                  "--dialect (qwen2.5-vl, qwen3-vl, qwen2-vl, qwen-vl, "
                                  "deepseek-vl2)")
        self.dialect = get_dialect(dialect)
        self.min_pixels, self.max_pixels = resolve_budget(self.dialect, min_pixels, max_pixels)

    @property
    def preferred_batch(self) -> int:
        """How many requests the Detector should hand over at once: enough to keep
        ``concurrency`` in flight across a chunk boundary, few enough to bound memory."""
        return 4 * self.concurrency

    def frame(self, image_size: Size) -> Size:
        """The size of the image sent for an original of ``image_size``."""
        if self.dialect.factor is None:
            w, h = image_size
            if self.max_pixels and w * h > self.max_pixels:
                scale = (self.max_pixels / (w * h)) ** 0.5
                return max(1, int(w * scale)), max(1, int(h * scale))
            return image_size
        return model_frame(self.dialect, *image_size, min_pixels=self.min_pixels,
                           max_pixels=self.max_pixels)

    # -- sync facade over a private event loop ------------------------------------------

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The private event loop, in a daemon thread of its own; closed with its HTTP
        clients by close() or, failing that, when the backend is collected."""
        with self._loop_lock:
            if self._loop is None:
                loop = self._loop = _new_loop()
                clients = self._clients[id(loop)] = []
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="grounding-remote").start()
                self._finalizer = weakref.finalize(self, _shutdown, loop, clients)
            return self._loop

    def _run(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._event_loop()).result()

    def generate(self, requests: list[Request]) -> list[Generation | Exception]:
        return self._run(self.agenerate(requests))

    def stream(self, requests: Iterable[Request]) -> Iterator[Generation | Exception]:
        """Results in input order while ``concurrency`` requests stay in flight across the
        whole stream (no batch barriers); at most ``preferred_batch`` are queued ahead, so
        memory stays bounded however long ``requests`` is."""
        loop = self._event_loop()
        gate = _OrderedGate(self.concurrency)
        pending: deque[concurrent.futures.Future] = deque()
        for request in requests:
            pending.append(asyncio.run_coroutine_threadsafe(self._gated(request, gate), loop))
            if len(pending) >= self.preferred_batch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        """Close the HTTP connections and stop the private event loop and threads (a
        later request starts them again)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        self._clients.pop(id(loop), None)
        if self._finalizer is not None:
            self._finalizer()
        old, self._encoder = self._encoder, _encoder_pool()  # threads start on first use
        old.shutdown(wait=False)

    async def aclose(self) -> None:
        """Close the HTTP clients that requests made on the running event loop (the async
        API: agenerate() on your own loop)."""
        clients = self._clients.pop(id(asyncio.get_running_loop()), [])
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    # -- async core ---------------------------------------------------------------------

    def _client(self) -> Any:
        """An AsyncOpenAI client of the running event loop (pools are bound to a loop).

        Requests rotate over one client per CLIENT_CONNECTIONS in flight: an HTTP pool
        checks every one of its connections on each request, so several small pools cost
        less CPU than one large one at high concurrency (measured with bench/remote.py)."""
        import openai

        clients = self._clients.setdefault(id(asyncio.get_running_loop()), [])
        if not clients:  # filled in place: the private loop's finalizer holds this list
            count = max(1, -(-self.concurrency // CLIENT_CONNECTIONS))
            clients.extend(
                openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key or "none",
                                   default_headers=self._headers, timeout=self.timeout,
                                   max_retries=0, http_client=_http_client(self.timeout))
                for _ in range(count))
        self._turn += 1
        return clients[self._turn % len(clients)]

    async def agenerate(self, requests: list[Request]) -> list[Generation | Exception]:
        gate = _OrderedGate(self.concurrency)
        return list(await asyncio.gather(*(self._gated(r, gate) for r in requests)))

    def _prepare(self, request: Request) -> tuple[Size, list[str], float]:
        """The target's frame and the data URLs of the references, then the target."""
        started = time.perf_counter()
        urls = [self._reference_url(r) for r in request.references]
        frame = self.frame(request.image.size)
        urls.append(_encode(request.image, frame, self.image_format))
        return frame, urls, time.perf_counter() - started

    def _reference_url(self, image: Image.Image) -> str:
        """A reference image's data URL, in its own frame; encoded once per run, since every
        request of the run shows the same references."""
        key = id(image)
        with self._references_lock:  # held while encoding: the other thread waits, not redoes
            hit = self._references.get(key)
            if hit is not None and hit[0] is image:
                self._references.move_to_end(key)
                return hit[1]
            url = _encode(image, self.frame(image.size), self.image_format)
            self._references[key] = (image, url)  # the image is kept: its id stays its own
            while len(self._references) > REFERENCE_CACHE:
                self._references.popitem(last=False)
        return url

    async def _gated(self, request: Request, gate: _OrderedGate) -> Generation | Exception:
        """Encode (in a worker thread) before taking a slot, so that when a slot frees the
        next body is ready and a wave of answers does not wait on a queue of encodes.
        Slots are taken in input order: requests are sent in the order they came."""
        ticket = gate.ticket()  # before any await: tickets follow input order
        try:
            frame, urls, seconds = await asyncio.get_running_loop().run_in_executor(
                self._encoder, self._prepare, request)
        except Exception as exc:
            gate.skip(ticket)
            return RemoteError(self._scrub(f"cannot prepare the image: {exc}"))
        try:
            async with gate.slot(ticket):
                generation = await self._request(request, frame, urls)
            generation.timings["preprocess"] = seconds
            return generation
        except RemoteError as exc:
            return exc
        except Exception as exc:  # a bug or an unexpected answer: that image only
            return RemoteError(self._scrub(f"{type(exc).__name__}: {exc}"))

    async def _first_model(self) -> str:
        text = await self._call(lambda c: c.get("/models", cast_to=str, options=self._options()),
                                "GET /models")
        try:
            return json.loads(text)["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteError(f"{self.base_url}/models lists no model: pass --model") from None

    async def _request(self, request: Request, frame: Size, urls: list[str]) -> Generation:
        sent = time.perf_counter()
        body = self._body(request, urls)
        try:
            generation = await self._post(body, frame)
        except RemoteError as exc:
            if not (self.logprobs and exc.status == 400 and "logprob" in str(exc).lower()):
                raise
            log.warning("grounding: %s does not support logprobs; continuing without them",
                        self.base_url)
            self.logprobs = False
            body.pop("logprobs", None)
            generation = await self._post(body, frame)
        generation.timings = {"preprocess": 0.0, "generate": time.perf_counter() - sent,
                              "decode": 0.0}
        return generation

    def _body(self, request: Request, image_urls: list[str]) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}
                                       for url in image_urls]
        text = {"type": "text", "text": request.prompt}
        messages.append({"role": "user",
                         "content": [text, *parts] if self.text_first else [*parts, text]})
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                self.token_param: request.max_new_tokens or self.max_new_tokens,
                                "temperature": 0.0}
        if self.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = TOP_LOGPROBS
        if (self.json_schema and self.dialect.name in ("qwen2.5-vl", "qwen3-vl")
                and request.task in ("boxes", "points")):  # not yes/no or free answers
            body["response_format"] = json_schema(request.task)
        body.update(self.extra_body)
        return body

    def _options(self) -> dict[str, Any]:
        """Per-request options: without a bearer key the Authorization header is left out."""
        import openai

        return {} if self._auth_in_bearer else {"headers": {"Authorization": openai.Omit()}}

    async def _post(self, body: dict[str, Any], frame: Size) -> Generation:
        return await self._call(
            lambda c: c.post(self.endpoint, cast_to=str, body=body, options=self._options()),
            f"POST {self.endpoint}", lambda text: self._generation(text, frame))

    async def _call(self, send, what: str, read=None):
        """Send with retries: 429 and 503 (Retry-After honoured, up to MAX_RETRY_AFTER), other
        5xx, connection errors, timeouts, and error bodies that say "rate limit" or "busy"
        under HTTP 200 (Qianfan) back off exponentially with jitter; other 4xx fail at once.
        ``read`` turns the answer's text into the result (and may raise RemoteError)."""
        import openai

        attempt = 0
        while True:
            wait: float | None = None
            try:
                text = await send(self._client())
                return read(text) if read is not None else text
            except RemoteError as exc:
                if not exc.retryable:
                    raise
                error = exc
            except openai.APIStatusError as exc:
                error = self._status_error(exc, what)
                if not error.retryable:
                    raise error from None
                if exc.status_code in (429, 503):
                    wait = _retry_after(exc.response.headers)
                    wait = None if wait is None else min(wait, MAX_RETRY_AFTER)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                kind = "timed out" if isinstance(exc, openai.APITimeoutError) else (
                    "connection failed")
                error = RemoteError(f"{what} to {self.base_url} {kind}: {exc}", retryable=True)
            if attempt >= self.max_retries:
                raise RemoteError(self._scrub(f"{error} (gave up after {attempt + 1} attempts)"),
                                  error.status) from None
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1)
            attempt += 1
            log.info("grounding: %s; retry %d/%d in %.2fs", error, attempt, self.max_retries, wait)
            await asyncio.sleep(wait)

    def _status_error(self, exc: Any, what: str) -> RemoteError:
        status = exc.status_code
        try:
            detail = provider_message(exc.response.text)
        except Exception:  # a body that cannot be read says nothing more
            detail = None
        hint = _STATUS_HINTS.get(status, "server error" if status >= 500 else "request failed")
        message = f"{what} to {self.base_url} failed with HTTP {status}: {hint}"
        if detail:
            message += f": {detail}"
        retryable = status == 429 or status >= 500 or status == 408
        return RemoteError(self._scrub(message), status, retryable)

    def _generation(self, text: str, frame: Size) -> Generation:
        try:
            data = json.loads(text)
        except ValueError:
            snippet = " ".join(text.split())[:120]
            raise RemoteError(f"the server's answer is not JSON: {snippet!r}") from None
        detail = provider_message(data) if isinstance(data, dict) else None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not choices:
            reason = detail or "no choices in the answer"
            busy = detail is not None and any(w in detail.lower() for w in _BUSY_WORDS)
            raise RemoteError(self._scrub(f"the server returned no answer: {reason}"),
                              retryable=busy)
        choice = choices[0]
        message = choice.get("message") or {}
        content = message.get("content")
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RemoteError("the server's answer has no text content")
        tokens = logprobs = None
        entries = (choice.get("logprobs") or {}).get("content") if isinstance(
            choice.get("logprobs"), dict) else None
        top = None
        if entries:
            tokens = [str(e.get("token", "")) for e in entries]
            logprobs = [float(e.get("logprob", 0.0)) for e in entries]
            top = [{str(t.get("token", "")): float(t.get("logprob", 0.0))
                    for t in (e.get("top_logprobs") or []) if isinstance(t, dict)}
                   for e in entries]
        return Generation(text=content, input_size=frame,
                          truncated=choice.get("finish_reason") in TRUNCATED_REASONS,
                          tokens=tokens, token_logprobs=logprobs, top_logprobs=top)

    def _scrub(self, text: str) -> str:
        """Never let the API key into a message, a record or a log line."""
        return text.replace(self._key, "***") if self._key else text
