"""Bounded admission: at most `max_concurrent` HTTP requests inside the engine, at most `max_queue` waiting for
a slot (most urgent priority first, then arrival order); beyond that the caller is told to come back later
instead of the server queueing without bound. Event-loop only (no locks)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class QueueFull(Exception):
    """Every slot is taken and the waiting queue is full."""


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        """`on_change(active, queued)`: told of every change (the API processes' shared load board)."""
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self._on_change = on_change or (lambda active, queued: None)
        self.active = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self, priority: int, timeout: float | None) -> None:
        """Take a slot, waiting at most `timeout` s (TimeoutError); QueueFull at once when the queue is full."""
        if self.active < self.max_concurrent and not self._waiters:
            self.active += 1
            self._on_change(self.active, len(self._waiters))
            return
        if len(self._waiters) >= self.max_queue:
            raise QueueFull
        entry = (priority, next(self._order), asyncio.get_running_loop().create_future())
        heapq.heappush(self._waiters, entry)
        self._on_change(self.active, len(self._waiters))
        try:
            await asyncio.wait_for(entry[2], timeout)
        except BaseException:
            fut = entry[2]
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            elif entry in self._waiters:
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
                self._on_change(self.active, len(self._waiters))
            raise

    def release(self) -> None:
        """Give a slot back: to the most urgent waiter if any."""
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                self._on_change(self.active, len(self._waiters))
                return
        self.active -= 1
        self._on_change(self.active, len(self._waiters))
