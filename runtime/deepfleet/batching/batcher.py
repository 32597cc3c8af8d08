"""The dynamic batcher: a queue in front of one backend, drained by one worker thread per instance.

A worker forms a batch when it is free: it starts with the oldest queued request and takes later requests
with the same shape key, until it holds the target number of rows, the next such request does not fit, or
`max_queue_delay` has passed since the oldest request arrived (Triton's dynamic batcher rule).
Formation and execution run in the worker threads, not on the event loop: under load the loop is busy
parsing HTTP bodies, and a backend that waits for the loop to hand it the next batch sits idle (seen in
bench/batcher.py on a loaded 2-core box: with loop-side formation, one-at-a-time at 100 clients ran at a
third of its 1-client rate).

Requests carry an optional deadline: one that expires while queued or running is answered with
DeadlineExceeded (HTTP 504) and is never executed late. A full queue rejects new work at once
(ServiceUnavailable, HTTP 503) instead of letting latency grow without bound."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from deepfleet.batching import shapes
from deepfleet.batching.adaptive import AdaptiveBatchSize, LoadMeter
from deepfleet.batching.backends.base import Backend
from deepfleet.batching.errors import DeadlineExceeded, ServiceUnavailable
from deepfleet.batching.metrics import BatcherMetrics
from deepfleet.batching.repository import ModelConfig
from deepfleet.batching.shapes import Prepared


@dataclass(eq=False)
class _Pending:
    prepared: Prepared
    future: asyncio.Future
    enqueued: float
    deadline: float | None = None
    abandoned: bool = False  # set on the loop when the caller stopped waiting; read by workers


def _settle(future: asyncio.Future, outcome: object) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class DynamicBatcher:
    def __init__(self, config: ModelConfig, backend: Backend, metrics: BatcherMetrics):
        self.config = config
        self.backend = backend
        self._metrics = metrics
        self._delay_s = config.max_queue_delay_ms / 1000
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._workers: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        adaptive = config.adaptive
        self.controller = (
            AdaptiveBatchSize(adaptive.min_batch_size, config.max_batch_size) if adaptive.enabled else None
        )
        self._meter = LoadMeter(adaptive.interval_ms / 1000, config.instances, time.monotonic())
        metrics.target_batch_size.labels(config.name).set(self.target_batch_size)

    @property
    def target_batch_size(self) -> int:
        return self.controller.target if self.controller else self.config.max_batch_size

    def start(self) -> None:
        if self._workers:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        for i in range(self.config.instances):
            worker = threading.Thread(target=self._work, name=f"batcher-{self.config.name}-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for worker in self._workers:
            await asyncio.to_thread(worker.join)
        self._workers.clear()
        with self._cond:
            left, self._queue, self._queued_rows = list(self._queue), deque(), 0
        for p in left:
            _settle(p.future, ServiceUnavailable(f"model '{self.config.name}' is shutting down"))

    async def infer(self, prepared: Prepared, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs (or its deadline)."""
        name = self.config.name
        if not self._workers or self._stopping:
            raise ServiceUnavailable(f"model '{name}' is not ready")
        now = time.monotonic()
        pending = _Pending(prepared, asyncio.get_running_loop().create_future(), now,
                           None if timeout_s is None else now + timeout_s)
        with self._cond:
            if self._queued_rows + prepared.rows > self.config.max_queue_size:
                self._metrics.requests.labels(name, "queue_full").inc()
                raise ServiceUnavailable(
                    f"model '{name}' queue is full ({self.config.max_queue_size} rows); retry later"
                )
            self._queue.append(pending)
            self._queued_rows += prepared.rows
            self._metrics.queued_rows.labels(name).set(self._queued_rows)
            # Wake a worker only when that can change its decision: the first request (a delay window
            # opens) or enough rows for a full batch. Waking it on every arrival makes the worker and
            # the event loop trade the GIL per request, which costs more than the batching saves.
            if len(self._queue) == 1 or self._queued_rows >= self.target_batch_size:
                self._cond.notify()
        try:
            result = await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except (asyncio.TimeoutError, DeadlineExceeded):
            self._metrics.requests.labels(name, "deadline_exceeded").inc()
            raise DeadlineExceeded(f"deadline of {timeout_s * 1000:.1f} ms exceeded") from None
        except Exception:
            self._metrics.requests.labels(name, "error").inc()
            raise
        finally:
            pending.abandoned = True  # deadline passed or caller gone: workers skip it
        self._metrics.requests.labels(name, "ok").inc()
        return result

    # ---- worker threads ----

    def _deliver(self, pending: _Pending, outcome: object) -> None:
        self._loop.call_soon_threadsafe(_settle, pending.future, outcome)

    def _sweep(self, now: float) -> None:
        """Drop abandoned requests; fail queued ones whose deadline has passed. Caller holds the lock."""
        kept: deque[_Pending] = deque()
        for p in self._queue:
            if not p.abandoned and p.deadline is not None and now >= p.deadline:
                p.abandoned = True
                self._deliver(p, DeadlineExceeded("deadline exceeded while queued"))
            if p.abandoned:
                self._queued_rows -= p.prepared.rows
            else:
                kept.append(p)
        self._queue = kept

    def _select(self, head: _Pending, target: int) -> tuple[list[_Pending], int, bool]:
        """Requests batchable with `head` in arrival order, their rows, and whether one was left out for
        lack of room (the batch is then as full as it will get: waiting longer would only delay it)."""
        batch, rows, overflow = [head], head.prepared.rows, False
        for p in self._queue:
            if rows >= target:
                break
            if p is not head and p.prepared.key == head.prepared.key:
                if rows + p.prepared.rows <= target:
                    batch.append(p)
                    rows += p.prepared.rows
                else:
                    overflow = True
        return batch, rows, overflow

    def _next_batch(self) -> list[_Pending] | None:
        """Block until a batch is due (full, or its oldest request waited max_queue_delay); None on stop."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                now = time.monotonic()
                self._sweep(now)
                if not self._queue:
                    self._cond.wait()
                    continue
                load = self._meter.poll(now)
                if load is not None and self.controller is not None:
                    self._metrics.target_batch_size.labels(self.config.name).set(self.controller.observe(load))
                head = self._queue[0]
                close_at = head.enqueued + self._delay_s
                target = self.target_batch_size
                batch, rows, overflow = self._select(head, target)
                if rows >= target or overflow or now >= close_at:
                    break
                self._cond.wait(close_at - now)
            taken = set(map(id, batch))
            self._queue = deque(p for p in self._queue if id(p) not in taken)
            self._queued_rows -= rows
        name = self.config.name
        self._metrics.queued_rows.labels(name).set(self._queued_rows)
        for p in batch:
            self._metrics.queue_delay.labels(name).observe(now - p.enqueued)
        return batch

    def _work(self) -> None:
        name = self.config.name
        while (batch := self._next_batch()) is not None:
            preps = [p.prepared for p in batch]
            started = time.monotonic()
            results = self._run(preps)
            busy = time.monotonic() - started
            with self._cond:
                self._meter.add_busy(busy)
            self._metrics.inference.labels(name).observe(busy)
            self._metrics.batch_size.labels(name).observe(sum(p.rows for p in preps))
            for p, outcome in zip(batch, results, strict=True):
                self._deliver(p, outcome)

    def _run(self, preps: list[Prepared]) -> list[dict[str, np.ndarray] | Exception]:
        try:
            outputs = self.backend.run(shapes.assemble(self.config, preps))
            return shapes.split(self.config, outputs, preps)
        except Exception as exc:
            if len(preps) == 1:
                return [exc]
            # Isolate the failure: one bad request must not fail the others batched with it.
            return [self._run([p])[0] for p in preps]
