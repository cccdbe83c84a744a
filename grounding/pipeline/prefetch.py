"""Ordered, bounded parallel map: decode the next images while the model works."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(items: Iterable[T], fn: Callable[[T], R], *, workers: int = 4,
             ahead: int = 16, inline: Callable[[T], bool] | None = None) -> Iterator[R]:
    """``map(fn, items)`` in input order, ``fn`` running in ``workers`` threads with at most
    ``ahead`` results waiting. Memory stays bounded however long ``items`` is; exceptions
    from ``fn`` are re-raised in order (wrap ``fn`` to turn them into values). Items for
    which ``inline(item)`` is true are done in the caller's thread: work too small to be
    worth a thread hand-off (and the GIL contention that comes with it)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    ahead = max(1, ahead)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grounding-io") as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            if inline is not None and inline(item):
                done: Future[R] = Future()
                try:
                    done.set_result(fn(item))
                except Exception as exc:
                    done.set_exception(exc)
                pending.append(done)
            else:
                pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
