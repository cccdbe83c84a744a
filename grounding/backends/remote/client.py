"""Any OpenAI-compatible chat-completions server: vLLM, SGLang, hosted Qwen-VL / DeepSeek-VL2.

Exact coordinates: a server resizes images its own way and does not say how (vLLM with
its processor's pixel limits, hosted APIs with their own, per-request pixel hints are
often ignored). So the client sends an image that is already in the dialect's model frame
(upright, resized with the same rule under grounding's pixel budget): the server's own
resize leaves such an image as it is, and boxes map back from the frame that was sent.
Relative dialects (Qwen2-VL, Qwen3-VL, DeepSeek-VL2) are exact whatever the server does.

This module is the backend itself: what it is asked, in what order, and when to try a
request again. What goes over the wire is in codec.py, when a failure is worth a retry
in retry.py, the input-order gate in gate.py, the event loop and HTTP pools in loop.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any

from grounding.backends.base import Generation, Request
from grounding.backends.options import RemoteOptions
from grounding.backends.remote.codec import ImageEncoder, chat_body, read_generation
from grounding.backends.remote.gate import OrderedGate
from grounding.backends.remote.loop import encoder_pool, new_loop, open_clients, shutdown
from grounding.backends.remote.retry import (
    RemoteError,
    RetryPolicy,
    describe_status,
    provider_message,
    retry_after,
    retryable_status,
)
from grounding.core.dialects import Dialect, get_dialect, guess_dialect
from grounding.core.geometry import Size, model_frame, resolve_budget

log = logging.getLogger("grounding")


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
        model: str | None = RemoteOptions.model,
        *,
        base_url: str,
        dialect: str | Dialect | None = RemoteOptions.dialect,
        api_key_env: str | None = RemoteOptions.api_key_env,
        api_key_header: str = RemoteOptions.api_key_header,
        headers: dict[str, str] | None = RemoteOptions.headers,
        endpoint: str = RemoteOptions.endpoint,
        timeout: float = RemoteOptions.timeout,
        concurrency: int = RemoteOptions.concurrency,
        max_retries: int = RemoteOptions.max_retries,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        min_pixels: int | None = RemoteOptions.min_pixels,
        max_pixels: int | None = RemoteOptions.max_pixels,
        max_new_tokens: int = RemoteOptions.max_new_tokens,
        token_param: str = RemoteOptions.token_param,
        logprobs: bool = RemoteOptions.logprobs,
        json_schema: bool = RemoteOptions.json_schema,
        image_format: str = RemoteOptions.image_format,
        text_first: bool = RemoteOptions.text_first,
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
        self._images = ImageEncoder()
        self.extra_body = dict(extra_body or {})
        self._clients: dict[int, list[Any]] = {}
        self._encoder = encoder_pool()
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
                loop = self._loop = new_loop()
                clients = self._clients[id(loop)] = []
                threading.Thread(target=loop.run_forever, daemon=True,
                                 name="grounding-remote").start()
                self._finalizer = weakref.finalize(self, shutdown, loop, clients)
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
        gate = OrderedGate(self.concurrency)
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
        old, self._encoder = self._encoder, encoder_pool()  # threads start on first use
        old.shutdown(wait=False)

    async def aclose(self) -> None:
        """Close the HTTP clients that requests made on the running event loop (the async
        API: agenerate() on your own loop)."""
        clients = self._clients.pop(id(asyncio.get_running_loop()), [])
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    # -- async core ---------------------------------------------------------------------

    def _client(self) -> Any:
        """An AsyncOpenAI client of the running event loop; requests rotate over its pool
        (loop.open_clients)."""
        clients = self._clients.setdefault(id(asyncio.get_running_loop()), [])
        if not clients:  # filled in place: the private loop's finalizer holds this list
            clients.extend(open_clients(self.concurrency, base_url=self.base_url,
                                        api_key=self._key or "none", headers=self._headers,
                                        timeout=self.timeout))
        self._turn += 1
        return clients[self._turn % len(clients)]

    async def agenerate(self, requests: list[Request]) -> list[Generation | Exception]:
        gate = OrderedGate(self.concurrency)
        return list(await asyncio.gather(*(self._gated(r, gate) for r in requests)))

    def _prepare(self, request: Request) -> tuple[Size, list[str], float]:
        """The target's frame and the data URLs of the references, then the target."""
        started = time.perf_counter()
        frame, urls = self._images.encode(request, self.frame, self.image_format)
        return frame, urls, time.perf_counter() - started

    async def _gated(self, request: Request, gate: OrderedGate) -> Generation | Exception:
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
        return chat_body(request, image_urls, model=self.model, dialect=self.dialect.name,
                         max_new_tokens=self.max_new_tokens, token_param=self.token_param,
                         logprobs=self.logprobs, schema=self.json_schema,
                         text_first=self.text_first, extra_body=self.extra_body)

    def _options(self) -> dict[str, Any]:
        """Per-request options: without a bearer key the Authorization header is left out."""
        import openai

        return {} if self._auth_in_bearer else {"headers": {"Authorization": openai.Omit()}}

    async def _post(self, body: dict[str, Any], frame: Size) -> Generation:
        return await self._call(
            lambda c: c.post(self.endpoint, cast_to=str, body=body, options=self._options()),
            f"POST {self.endpoint}", lambda text: self._read(text, frame))

    def _read(self, text: str, frame: Size) -> Generation:
        try:
            return read_generation(text, frame)
        except RemoteError as exc:  # a provider's message may quote the request
            raise RemoteError(self._scrub(str(exc)), exc.status, exc.retryable) from None

    async def _call(self, send, what: str, read=None):
        """Send with retries (retry.RetryPolicy): 429 and 503 (Retry-After honoured, up to
        MAX_RETRY_AFTER), other 5xx, connection errors, timeouts, and error bodies that say
        "rate limit" or "busy" under HTTP 200 (Qianfan) back off exponentially with jitter;
        other 4xx fail at once. ``read`` turns the answer's text into the result (and may
        raise RemoteError)."""
        import openai

        policy = RetryPolicy(self.max_retries, self.backoff, self.max_backoff)
        attempt = 0
        while True:
            asked: float | None = None  # the wait the server asked for
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
                asked = retry_after(exc.status_code, exc.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                kind = "timed out" if isinstance(exc, openai.APITimeoutError) else (
                    "connection failed")
                error = RemoteError(f"{what} to {self.base_url} {kind}: {exc}", retryable=True)
            wait = policy.delay(attempt, asked)
            if wait is None:
                raise RemoteError(self._scrub(f"{error} (gave up after {attempt + 1} attempts)"),
                                  error.status) from None
            attempt += 1
            log.info("grounding: %s; retry %d/%d in %.2fs", error, attempt, self.max_retries, wait)
            await asyncio.sleep(wait)

    def _status_error(self, exc: Any, what: str) -> RemoteError:
        status = exc.status_code
        try:
            detail = provider_message(exc.response.text)
        except Exception:  # a body that cannot be read says nothing more
            detail = None
        message = f"{what} to {self.base_url} failed with {describe_status(status, detail)}"
        return RemoteError(self._scrub(message), status, retryable_status(status))

    def _scrub(self, text: str) -> str:
        """Never let the API key into a message, a record or a log line."""
        return text.replace(self._key, "***") if self._key else text
