"""The machinery under OpenAIBackend's synchronous API: its private event loop, the HTTP
client pools bound to a loop, the encoder threads, and closing them all.

Apart from the backend because none of it is about the chat API: these are the choices
that bench/remote.py measured (uvloop, the SDK over aiohttp, several small pools, two
encoder threads), and the care an open aiohttp session needs at shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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


def shutdown(loop: asyncio.AbstractEventLoop, clients: list[Any]) -> None:
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
