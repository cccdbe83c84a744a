"""Requests go out in the order they came, however their images finish encoding.

Images are encoded in worker threads before a request takes one of the ``concurrency``
slots, and a small image can finish before a large one that came first. A plain
semaphore would then send them out of order; OrderedGate hands out slots by ticket.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class OrderedGate:
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
        """The next place in line; take it before any await, so places follow input order."""
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
        """Give up ``ticket`` without a slot (its request failed before it was sent)."""
        if ticket == self._next:
            self._advance()
        else:
            self._skipped.add(ticket)

    @contextlib.asynccontextmanager
    async def slot(self, ticket: int) -> AsyncIterator[None]:
        """Wait for ``ticket``'s turn and a free slot; hold the slot inside the block."""
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
