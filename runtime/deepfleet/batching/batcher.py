"""The dynamic batcher: an asyncio queue in front of one backend.

A batch is formed when an instance (worker slot) is free: it starts with the oldest queued request and
takes later requests with the same shape key, until it holds the target number of rows or
`max_queue_delay` has passed since the oldest request arrived (Triton's dynamic batcher rule).
Requests carry an optional deadline: one that expires while queued or running is answered with
DeadlineExceeded (HTTP 504) and is never executed late. A full queue rejects new work at once
(ServiceUnavailable, HTTP 503) instead of letting latency grow without bound."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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


class DynamicBatcher:
    def __init__(self, config: ModelConfig, backend: Backend, metrics: BatcherMetrics):
        self.config = config
        self.backend = backend
        self._metrics = metrics
        self._delay_s = config.max_queue_delay_ms / 1000
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._arrival = asyncio.Event()
        self._slots = asyncio.Semaphore(config.instances)
        self._executor = ThreadPoolExecutor(config.instances, thread_name_prefix=f"batch-{config.name}")
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
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
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.config.name}")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(ServiceUnavailable(f"model '{self.config.name}' is shutting down"))
        self._queued_rows = 0
        self._executor.shutdown(wait=True)

    async def infer(self, prepared: Prepared, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request and wait for its outputs (or its deadline)."""
        name = self.config.name
        if self._loop_task is None:
            raise ServiceUnavailable(f"model '{name}' is not ready")
        if self._queued_rows + prepared.rows > self.config.max_queue_size:
            self._metrics.requests.labels(name, "queue_full").inc()
            raise ServiceUnavailable(f"model '{name}' queue is full ({self.config.max_queue_size} rows); retry later")
        now = time.monotonic()
        pending = _Pending(prepared, asyncio.get_running_loop().create_future(), now,
                           None if timeout_s is None else now + timeout_s)
        self._queue.append(pending)
        self._queued_rows += prepared.rows
        self._metrics.queued_rows.labels(name).set(self._queued_rows)
        self._arrival.set()
        try:
            result = await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except asyncio.TimeoutError:
            self._metrics.requests.labels(name, "deadline_exceeded").inc()
            raise DeadlineExceeded(f"deadline of {timeout_s * 1000:.1f} ms exceeded") from None
        except DeadlineExceeded:
            self._metrics.requests.labels(name, "deadline_exceeded").inc()
            raise
        except Exception:
            self._metrics.requests.labels(name, "error").inc()
            raise
        finally:
            # An abandoned request (deadline, client gone) is marked done so the batcher skips it.
            if not pending.future.done():
                pending.future.cancel()
        self._metrics.requests.labels(name, "ok").inc()
        return result

    async def _loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _sweep(self, now: float) -> None:
        """Drop abandoned requests; fail queued ones whose deadline has passed."""
        kept: deque[_Pending] = deque()
        for p in self._queue:
            if not p.future.done() and p.deadline is not None and now >= p.deadline:
                p.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
            if p.future.done():
                self._queued_rows -= p.prepared.rows
            else:
                kept.append(p)
        self._queue = kept

    def _select(self, head: _Pending, target: int) -> tuple[list[_Pending], int]:
        batch, rows = [head], head.prepared.rows
        for p in self._queue:
            if p is not head and p.prepared.key == head.prepared.key and rows + p.prepared.rows <= target:
                batch.append(p)
                rows += p.prepared.rows
                if rows == target:
                    break
        return batch, rows

    def _adapt(self, now: float) -> None:
        load = self._meter.poll(now)
        if load is not None and self.controller is not None:
            self._metrics.target_batch_size.labels(self.config.name).set(self.controller.observe(load))

    async def _form_batch(self) -> list[_Pending]:
        while True:
            now = time.monotonic()
            self._sweep(now)
            if not self._queue:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            self._adapt(now)
            head = self._queue[0]
            close_at = head.enqueued + self._delay_s
            batch, rows = self._select(head, self.target_batch_size)
            if rows >= self.target_batch_size or now >= close_at:
                break
            self._arrival.clear()
            try:
                await asyncio.wait_for(self._arrival.wait(), close_at - now)
            except asyncio.TimeoutError:
                pass
        taken = set(map(id, batch))
        self._queue = deque(p for p in self._queue if id(p) not in taken)
        self._queued_rows -= rows
        self._metrics.queued_rows.labels(self.config.name).set(self._queued_rows)
        for p in batch:
            self._metrics.queue_delay.labels(self.config.name).observe(now - p.enqueued)
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        try:
            preps = [p.prepared for p in batch]
            started = time.monotonic()
            results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, preps)
            busy = time.monotonic() - started
            self._meter.add_busy(busy)
            self._metrics.inference.labels(self.config.name).observe(busy)
            self._metrics.batch_size.labels(self.config.name).observe(sum(p.rows for p in preps))
            for p, result in zip(batch, results, strict=True):
                if p.future.done():
                    continue
                if isinstance(result, Exception):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)
        finally:
            self._slots.release()

    def _run(self, preps: list[Prepared]) -> list[dict[str, np.ndarray] | Exception]:
        try:
            outputs = self.backend.run(shapes.assemble(self.config, preps))
            return shapes.split(self.config, outputs, preps)
        except Exception as exc:
            if len(preps) == 1:
                return [exc]
            # Isolate the failure: one bad request must not fail the others batched with it.
            return [self._run([p])[0] for p in preps]
