"""OpenAIBackend's lifetime against the loopback server: nothing is sent once the consumer
stops (a break out of stream(), close() mid-stream), and nothing piles up over many
open / request / close cycles or many short-lived event loops (file descriptors, HTTP
clients, event loops, threads)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from grounding.backends.base import Generation, Request
from grounding.backends.remote import OpenAIBackend, RemoteError
from grounding.testing.loopback import LoopbackServer, fixed_handler


def image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def backend_for(server: LoopbackServer, **options) -> OpenAIBackend:
    options.setdefault("backoff", 0.01)
    options.setdefault("timeout", 10.0)
    return OpenAIBackend("loopback-model", base_url=server.base_url, dialect="qwen2.5-vl",
                         **options)


def settle(read, *, seconds: float = 3.0):
    """``read()`` once it has stopped changing (descriptors close a few milliseconds
    after the client closes them)."""
    last, stable_since = read(), time.perf_counter()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, stable_since = now, time.perf_counter()
        elif time.perf_counter() - stable_since >= 0.3:
            break
    return last


# ------------------------------------------------------------ stop when the consumer stops


def test_a_break_out_of_stream_sends_nothing_more():
    """stream() queues preferred_batch (4 x concurrency) requests ahead; after a break
    only those already in flight may have reached the server."""
    requests = [Request(image(i), "p") for i in range(100)]
    with LoopbackServer(handler=fixed_handler(), latency=0.3) as server:
        backend = backend_for(server, concurrency=4)
        assert backend.preferred_batch == 16
        results = backend.stream(requests)
        first = next(results)
        assert isinstance(first, Generation)
        results.close()  # what a for loop's break does once the generator is dropped
        time.sleep(1.5)  # the 16 queued, 4 at a time: all sent within 1.2 s if not stopped
        calls = server.calls
        backend.close()
    # the first 4 were answered together; at most the next 4 were sent meanwhile
    assert calls <= 8, calls


def test_a_stream_dropped_by_a_break_in_a_for_loop_sends_nothing_more():
    requests = (Request(image(i), "p") for i in range(100))
    with LoopbackServer(handler=fixed_handler(), latency=0.3) as server:
        backend = backend_for(server, concurrency=4)
        for n, result in enumerate(backend.stream(requests)):
            assert isinstance(result, Generation)
            if n == 1:
                break
        time.sleep(1.5)  # the 16 queued, 4 at a time: all sent within 1.2 s if not stopped
        calls = server.calls
        backend.close()
    assert calls <= 8, calls


def test_a_break_out_of_detect_many_sends_nothing_more():
    from grounding.pipeline.detector import Detector

    with LoopbackServer(handler=fixed_handler(), latency=0.3) as server:
        backend = backend_for(server, concurrency=4)
        for n, result in enumerate(Detector(backend).detect_many(
                (image(i) for i in range(100)), prompt="p")):
            assert result.error is None
            if n == 1:
                break
        time.sleep(1.5)
        calls = server.calls
        backend.close()
    assert calls <= 8, calls


def test_close_during_a_stream_cancels_what_is_not_sent():
    requests = [Request(image(i), "p") for i in range(100)]
    with LoopbackServer(handler=fixed_handler(), latency=0.3) as server:
        backend = backend_for(server, concurrency=4)
        results = backend.stream(requests)
        next(results)
        started = time.perf_counter()
        backend.close()
        closed_in = time.perf_counter() - started
        with pytest.raises(RemoteError, match="closed"):
            next(results)
        time.sleep(1.5)  # the 16 queued, 4 at a time: all sent within 1.2 s if not stopped
        calls = server.calls
        # the backend still works after close() (a fresh loop and clients)
        again = backend.generate([Request(image(), "p")])
        backend.close()
    assert calls <= 8, calls
    assert closed_in < 2.0, closed_in
    assert isinstance(again[0], Generation)


def test_close_from_another_thread_ends_a_waiting_generate():
    with LoopbackServer(handler=fixed_handler(), latency=5.0) as server:
        backend = backend_for(server, concurrency=2)
        out: list = []
        worker = threading.Thread(target=lambda: out.extend(
            backend.generate([Request(image(i), "p") for i in range(6)])))
        worker.start()
        time.sleep(0.3)
        backend.close()
        worker.join(3.0)
        calls = server.calls
    assert not worker.is_alive()
    assert len(out) == 6 and all(isinstance(e, RemoteError) for e in out)
    assert "closed" in str(out[0])
    assert calls <= 2, calls


# ------------------------------------------------------------------ nothing piles up


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_open_request_close_cycles_leave_no_file_descriptors():
    """close() closes the private event loop too (uvloop's holds several descriptors) and
    joins its thread."""
    with LoopbackServer(handler=fixed_handler()) as server:
        for _ in range(3):  # warm up: imports, the server's own first connections
            backend = backend_for(server)
            assert isinstance(backend.generate([Request(image(), "p")])[0], Generation)
            backend.close()
        before = settle(open_fds)
        threads = threading.active_count()
        for _ in range(30):
            backend = backend_for(server)
            assert isinstance(backend.generate([Request(image(), "p")])[0], Generation)
            backend.close()
        after = settle(open_fds)
        assert threading.active_count() <= threads
    assert after - before <= 2, (before, after)


def test_agenerate_on_many_short_lived_loops_keeps_no_clients():
    """Under asyncio.run the HTTP clients close when the loop's coroutine returns; none
    pile up in the backend, and nothing is left open (no ResourceWarning, no descriptor)."""
    from grounding.backends.remote.loop import _KEEPERS

    with LoopbackServer(handler=fixed_handler()) as server:
        backend = backend_for(server)
        keepers = len(_KEEPERS)

        async def one() -> list:
            out = await backend.agenerate([Request(image(), "p")])
            assert len(backend._pools) == 1  # reused within the loop
            again = await backend.agenerate([Request(image(1), "p")])
            return out + again

        for _ in range(3):
            asyncio.run(one())
        before = settle(open_fds) if os.path.isdir("/proc/self/fd") else 0
        for _ in range(20):
            out = asyncio.run(one())
            assert all(isinstance(g, Generation) for g in out)
            assert backend._pools == {}
        gc.collect()
        after = settle(open_fds) if os.path.isdir("/proc/self/fd") else 0
        assert len(_KEEPERS) == keepers
        backend.close()
    assert after - before <= 2, (before, after)


def test_agenerate_under_uvloop_run_keeps_no_clients():
    uvloop = pytest.importorskip("uvloop")
    outcome: list = []

    def run(backend: OpenAIBackend) -> None:
        # loops come and go at the same address: clients kept by id(loop) would be handed
        # from a closed loop to the next one (and uvloop's close would hang on them)
        for _ in range(5):
            out = uvloop.run(backend.agenerate([Request(image(), "p")]))
            outcome.append((isinstance(out[0], Generation), dict(backend._pools)))

    with LoopbackServer(handler=fixed_handler()) as server:
        backend = backend_for(server)
        worker = threading.Thread(target=run, args=(backend,), daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "an event loop did not close"
        backend.close()
    assert outcome == [(True, {})] * 5


def test_aclose_then_agenerate_again_on_the_same_loop():
    async def use(backend) -> list:
        first = await backend.agenerate([Request(image(), "p")])
        await backend.aclose()
        assert backend._pools == {}
        second = await backend.agenerate([Request(image(), "p")])
        await backend.aclose()
        return first + second

    with LoopbackServer(handler=fixed_handler()) as server:
        out = asyncio.run(use(backend_for(server)))
    assert all(isinstance(g, Generation) for g in out)
