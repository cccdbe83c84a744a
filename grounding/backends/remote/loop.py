"""The machinery under OpenAIBackend's synchronous API: its private event loop, the HTTP
client pools bound to a loop, the encoder threads, and closing them all (the loop too: an
event loop left open keeps its file descriptors).

Apart from the backend because none of it is about the chat API: these are the choices
that bench/remote.py measured (uvloop, the SDK over aiohttp, several small pools, two
encoder threads), and the care an open aiohttp session needs at shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from typing import Any

ENCODE_THREADS = 2
"""Threads resizing and encoding images beside the event loop."""

CLIENT_CONNECTIONS = 8
"""Requests in flight per HTTP client (see open_clients)."""


def http_client(timeout: float) -> Any:
    """The SDK over aiohttp (``openai[aiohttp]``) when installed, else None (its httpx): the
    SDK's own transport costs about 60% more CPU per request (bench/remote.py)."""
    import openai

    try:
        return openai.DefaultAioHttpClient(timeout=timeout)
    except (AttributeError, RuntimeError):  # an older openai, or aiohttp not installed
        return None


def open_clients(concurrency: int, *, base_url: str, api_key: str,
                 headers: dict[str, str], timeout: float) -> list[Any]:
    """AsyncOpenAI clients for the running event loop (pools are bound to a loop), one per
    CLIENT_CONNECTIONS in flight: an HTTP pool checks every one of its connections on each
    request, so several small pools cost less CPU than one large one at high concurrency
    (measured with bench/remote.py). The SDK's own retries are off: the backend retries."""
    import openai

    count = max(1, -(-concurrency // CLIENT_CONNECTIONS))
    return [openai.AsyncOpenAI(base_url=base_url, api_key=api_key, default_headers=headers,
                               timeout=timeout, max_retries=0, http_client=http_client(timeout))
            for _ in range(count)]


def encoder_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Few threads: the compressor runs beside the loop; more would contend for the GIL."""
    return concurrent.futures.ThreadPoolExecutor(ENCODE_THREADS, "grounding-encode")


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (``pip install uvloop``): the event loop is the client's serial
    path, and uvloop's costs less CPU per request (bench/remote.py)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def start_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """A new event loop running in a daemon thread of its own (so it never keeps a process
    alive). Stopped by shutdown(); the thread then closes it (see _serve)."""
    loop = new_loop()
    thread = threading.Thread(target=_serve, args=(loop,), daemon=True,
                              name="grounding-remote")
    thread.start()
    return loop, thread


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run ``loop`` until it is stopped, then cancel what is left on it (requests not yet
    answered; the ClientPool keepers, which close their HTTP clients when cancelled) and
    close it: an event loop left open keeps its file descriptors (uvloop: several)."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task of ``loop`` (stopped) and run it until they have finished."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


def shutdown(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
             timeout: float = 10.0) -> None:
    """Stop ``loop``; its thread cancels the requests still on it, closes the HTTP clients
    and the loop. Waits up to ``timeout`` for that, unless called on that very thread (a
    backend collected there), which then finishes it when this call returns."""
    with contextlib.suppress(RuntimeError):  # already closed
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout)


_KEEPERS: set[asyncio.Task] = set()
"""The running ClientPool keepers: the event loop holds its tasks weakly, and a keeper
collected while pending would leave its clients open."""


class ClientPool:
    """The HTTP clients of one event loop (an aiohttp pool belongs to the loop it was
    opened on), kept for the loop's later requests and closed when the loop ends.

    A keeper task waits on the loop and closes the clients when it is cancelled, which
    happens however the loop ends tidily: ``asyncio.run`` (and ``uvloop.run``) cancel the
    tasks left when their coroutine returns, the backend's private loop cancels its own
    at close(), and :meth:`close` cancels it directly (``aclose()``). So a caller running
    ``agenerate`` under many short ``asyncio.run`` calls leaves nothing open behind.
    ``on_closed`` runs once the clients are closed."""

    def __init__(self, clients: list[Any], on_closed: Any = None) -> None:
        self.clients = clients
        self.loop = asyncio.get_running_loop()
        self._on_closed = on_closed
        self._keeper = self.loop.create_task(self._keep(), name="grounding-http-clients")
        _KEEPERS.add(self._keeper)
        self._keeper.add_done_callback(_KEEPERS.discard)

    async def _keep(self) -> None:
        try:
            await self.loop.create_future()  # until cancelled
        finally:
            clients, self.clients = self.clients, []
            try:
                await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            finally:
                if self._on_closed is not None:
                    self._on_closed(self)

    @property
    def closed(self) -> bool:
        return self._keeper.done()

    async def close(self) -> None:
        """Close the clients now (on their loop)."""
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._keeper)

    def abandon(self) -> None:
        """Forget a pool whose loop was closed without cancelling its tasks: nothing can
        close its clients any more."""
        _KEEPERS.discard(self._keeper)
