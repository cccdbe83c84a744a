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

Nothing is sent for a request whose result nobody will read: leaving ``stream()`` early
(``break``, the generator closed or collected) or ``close()`` cancels every request not
yet answered, those waiting for a slot included (a paid API bills what is sent).
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
from grounding.backends.remote.loop import (
    ClientPool,
    encoder_pool,
    open_clients,
    shutdown,
    start_loop,
)
from grounding.backends.remote.retry import (
    RemoteError,
    RetryPolicy,
    credentials,
    describe_status,
    provider_message,
    retry_after,
    retryable_status,
    transport_failure,
)
from grounding.core.dialects import Dialect, get_dialect, guess_dialect
from grounding.core.geometry import Size, model_frame, resolve_budget
from grounding.core.repetition import check_repeats

log = logging.getLogger("grounding")


class OpenAIBackend:
    """Requests to a chat-completions server, ``concurrency`` in flight, in input order.

    The API key is read from the environment variable ``api_key_env`` (never a value on
    the command line) and sent as ``Authorization: Bearer KEY``, or bare in
    ``api_key_header`` (Segmind: ``x-api-key``). That key, and the value of every
    credential-like header in ``headers`` (retry.credentials), are replaced by ``***`` in
    every error and log line. ``endpoint`` is the path under
    ``base_url`` (or a full URL) that takes the chat request. Without ``model`` the
    first one the server lists is used; without ``dialect`` it is guessed from the model
    name (an unknown name is an error, not a guess). An answer that ends in one object
    text written ``stop_repeats`` times in a row is flagged ``repetition`` (codec.
    read_generation): a server cannot be stopped mid-answer from here.
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
        stop_repeats: int = RemoteOptions.stop_repeats,
        token_param: str = RemoteOptions.token_param,
        logprobs: bool = RemoteOptions.logprobs,
        json_schema: bool = RemoteOptions.json_schema,
        image_format: str = RemoteOptions.image_format,
        text_first: bool = RemoteOptions.text_first,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        import openai  # noqa: F401 - fail at construction, not at the first request

        check_repeats(stop_repeats)
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
        self._own_auth = any(k.lower() == "authorization" for k in self._headers)
        """An Authorization header given in ``headers``: sent as it is."""
        self._secrets = credentials(self._headers, key)
        self.timeout = timeout
        self.concurrency = max(1, concurrency)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_new_tokens = max_new_tokens
        self.stop_repeats = stop_repeats
        """Flag an answer ending in this many copies of one object text (0: never)."""
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
        self._pools: dict[asyncio.AbstractEventLoop, ClientPool] = {}
        """The HTTP clients of each event loop in use (see loop.ClientPool)."""
        self._encoder = encoder_pool()
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._finalizer: weakref.finalize | None = None
        self._outstanding: set[concurrent.futures.Future] = set()
        """Work handed to the private loop and not finished: what close() cancels."""
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
        """The size of the image sent for an original of ``image_size``: the dialect's
        model frame (Qwen-VL: always 448x448, what its visual encoder takes; its
        coordinates are 0-1000 of that frame). A dialect without a resize rule
        (DeepSeek-VL2, which tiles) gets the image itself, scaled under ``max_pixels``."""
        if self.dialect.fixed_size is not None:
            return self.dialect.fixed_size
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
        """The private event loop, in a daemon thread of its own; stopped and closed, with
        its HTTP clients, by close() or, failing that, when the backend is collected."""
        with self._loop_lock:
            if self._loop is None:
                loop, thread = start_loop()
                self._loop = loop
                self._finalizer = weakref.finalize(self, shutdown, loop, thread)
            return self._loop

    def _submit(self, coro: Coroutine, loop: asyncio.AbstractEventLoop
                ) -> concurrent.futures.Future:
        """Run ``coro`` on the private ``loop``; RemoteError if close() ended that loop."""
        with self._loop_lock:
            if self._loop is not loop:
                coro.close()
                raise RemoteError("the backend was closed while its requests were pending")
            future = asyncio.run_coroutine_threadsafe(coro, loop)
            self._outstanding.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._loop_lock:
            self._outstanding.discard(future)

    @staticmethod
    def _wait(future: concurrent.futures.Future) -> Any:
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RemoteError("the backend was closed while its requests were pending") from None

    def _run(self, coro: Coroutine) -> Any:
        return self._wait(self._submit(coro, self._event_loop()))

    def generate(self, requests: list[Request]) -> list[Generation | Exception]:
        if not requests:
            return []
        try:
            return self._run(self.agenerate(requests))
        except RemoteError as exc:  # closed meanwhile: each request fails, none raises
            return [exc] * len(requests)

    def stream(self, requests: Iterable[Request]) -> Iterator[Generation | Exception]:
        """Results in input order while ``concurrency`` requests stay in flight across the
        whole stream (no batch barriers); at most ``preferred_batch`` are queued ahead, so
        memory stays bounded however long ``requests`` is.

        Leaving the loop early (``break``; the generator closed or collected) cancels
        every request not answered yet: those not sent are never sent. close() during
        the stream does the same, and the stream then raises RemoteError."""
        loop = self._event_loop()
        gate = OrderedGate(self.concurrency)
        pending: deque[concurrent.futures.Future] = deque()
        try:
            for request in requests:
                pending.append(self._submit(self._gated(request, gate), loop))
                if len(pending) >= self.preferred_batch:
                    yield self._wait(pending.popleft())
            while pending:
                yield self._wait(pending.popleft())
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        """Cancel the requests not answered yet (nothing more is sent), close the HTTP
        connections, stop and close the private event loop and its threads (a later
        request starts them again)."""
        with self._loop_lock:
            loop, self._loop = self._loop, None
            outstanding, self._outstanding = list(self._outstanding), set()
        if loop is None:
            return
        for future in outstanding:
            future.cancel()
        if self._finalizer is not None:
            self._finalizer()  # shutdown: the loop's thread cancels, closes, and is joined
        self._pools.pop(loop, None)
        old, self._encoder = self._encoder, encoder_pool()  # threads start on first use
        old.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Close the HTTP clients that requests made on the running event loop (the async
        API: agenerate() on your own loop). Not needed under ``asyncio.run``, which closes
        them when its coroutine returns; a later agenerate() opens new ones."""
        pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.close()

    # -- async core ---------------------------------------------------------------------

    def _client(self) -> Any:
        """An AsyncOpenAI client of the running event loop; requests rotate over its pool
        (loop.open_clients). The pool lives as long as the loop's tasks (loop.ClientPool):
        short-lived loops do not pile up clients."""
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None or not pool.clients:  # none yet, or closing
            for other in [p for p in list(self._pools.values()) if p.loop.is_closed()]:
                other.abandon()  # closed without cancelling its tasks: nothing to close on
                self._pools.pop(other.loop, None)
            pools = self._pools  # the pool's callback holds the dict, not the backend

            def forget(done: ClientPool) -> None:
                if pools.get(done.loop) is done:
                    pools.pop(done.loop, None)

            pool = self._pools[loop] = ClientPool(
                open_clients(self.concurrency, base_url=self.base_url,
                             api_key=self._key or "none", headers=self._headers,
                             timeout=self.timeout), forget)
        self._turn += 1
        return pool.clients[self._turn % len(pool.clients)]

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
        def first(text: str) -> str:
            try:
                data = json.loads(text)
            except ValueError:  # a proxy's page, a cut answer: worth another try
                raise RemoteError(f"{self.base_url}/models answered something that is not "
                                  "JSON", retryable=True) from None
            try:
                return str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise RemoteError(f"{self.base_url}/models lists no model: pass --model"
                                  ) from None

        return await self._call(
            lambda c: c.get("/models", cast_to=str, options=self._options()), "GET /models",
            first)

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
            for key in ("logprobs", "top_logprobs"):  # vLLM refuses top_logprobs alone
                body.pop(key, None)
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
        """Per-request options: without a bearer key (or an Authorization header of the
        caller's own) the SDK's placeholder Authorization header is left out."""
        import openai

        if self._auth_in_bearer or self._own_auth:
            return {}
        return {"headers": {"Authorization": openai.Omit()}}

    async def _post(self, body: dict[str, Any], frame: Size) -> Generation:
        return await self._call(
            lambda c: c.post(self.endpoint, cast_to=str, body=body, options=self._options()),
            f"POST {self.endpoint}", lambda text: self._read(text, frame))

    def _read(self, text: str, frame: Size) -> Generation:
        try:
            return read_generation(text, frame, repeats=self.stop_repeats)
        except RemoteError as exc:  # a provider's message may quote the request
            raise RemoteError(self._scrub(str(exc)), exc.status, exc.retryable,
                              exc.connection) from None

    async def _call(self, send, what: str, read=None):
        """Send with retries (retry.RetryPolicy): 429 and 503 (Retry-After honoured, up to
        MAX_RETRY_AFTER), other 5xx, dropped connections, timeouts, a 200 whose body is
        not JSON, and error bodies that say "rate limit" or "busy" under HTTP 200
        (Qianfan) back off exponentially with jitter; a connection that cannot be made
        (refused, host not found) is retried at most CONNECT_RETRIES times, quickly; other
        4xx fail at once. ``read`` turns the answer's text into the result (and may raise
        RemoteError). The error raised keeps ``status``, ``retryable`` and ``connection``
        of the last failure."""
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
                    raise RemoteError(self._scrub(str(exc)), exc.status, exc.retryable,
                                      exc.connection) from None
                error = exc
            except openai.APIStatusError as exc:
                error = self._status_error(exc, what)
                if not error.retryable:
                    raise error from None
                asked = retry_after(exc.status_code, exc.response.headers)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                error = self._transport_error(exc, what)
            wait = policy.delay(attempt, asked, error.connection)
            if wait is None:
                raise RemoteError(self._scrub(f"{error} (gave up after {attempt + 1} attempts)"),
                                  error.status, error.retryable, error.connection) from None
            attempt += 1
            log.info("grounding: %s; retry %d/%d in %.2fs", self._scrub(str(error)), attempt,
                     self.max_retries, wait)
            await asyncio.sleep(wait)

    def _transport_error(self, exc: BaseException, what: str) -> RemoteError:
        """No answer: a connection that could not be made (``connection=True``), was
        dropped, or timed out; the words come from the cause chain (retry.transport_failure),
        not from the SDK's "Request timed out." that it says for all of them."""
        message, connection = transport_failure(exc, self.base_url, self.timeout)
        if not connection:
            message = f"{what}: {message}"
        return RemoteError(self._scrub(message), None, retryable=True, connection=connection)

    def _status_error(self, exc: Any, what: str) -> RemoteError:
        status = exc.status_code
        try:
            detail = provider_message(exc.response.text)
        except Exception:  # a body that cannot be read says nothing more
            detail = None
        message = f"{what} to {self.base_url} failed with {describe_status(status, detail)}"
        return RemoteError(self._scrub(message), status, retryable_status(status))

    def _scrub(self, text: str) -> str:
        """Never let a credential the client sends (the API key, the value of any
        credential-like header) into a message, a record or a log line."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text
