"""The asyncio face of the synchronous `LLMEngine`.

One loop thread owns the engine (it is single-threaded): it applies queued add/abort commands, calls
`engine.step()`, and hands each step's outputs to the event loop in one `call_soon_threadsafe` batch. Each HTTP
request gets a `RequestStream` holding only the *latest* cumulative output per choice, so a slow reader costs
no memory and never stalls the engine. Admission (bounded, by priority) happens before the engine sees a
request; closing a stream early aborts it in the engine, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deepfleet.server.admission import Admission
from deepfleet.server.metrics import LoadSnapshot

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine loop stopped (a step raised, or the server shut down)."""


class StreamAborted(Exception):
    """The stream was closed before it finished (client gone)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it finished."""


class RequestStream:
    """Event-loop side of one HTTP request: `n` engine requests (one per choice) and their latest outputs."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.engine_ids = [f"{request_id}-{i}" for i in range(n)]
        self._latest: dict[int, Any] = {}
        self._done: set[int] = set()
        self._event = asyncio.Event()
        self._error: BaseException | None = None
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    @property
    def finished(self) -> bool:
        return len(self._done) == len(self.engine_ids)

    def _deliver(self, index: int, output: Any) -> None:
        self._latest[index] = output
        if output.finished:
            self._done.add(index)
        self._event.set()

    def _fail(self, exc: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(exc)
        self._error = exc
        self._event.set()

    async def updates(self, deadline: float | None = None) -> AsyncIterator[dict[int, Any]]:
        """Yields {choice index: latest cumulative RequestOutput} until every choice has finished; raises
        DeadlineExceeded once `deadline` (time.monotonic()) passes."""
        # one timer for the whole stream: a wait_for per update costs a timeout object and a heap reschedule per
        # event, which at hundreds of streams is a large share of the event loop's time
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._event.set()

        timer = None if deadline is None else asyncio.get_running_loop().call_later(
            max(deadline - time.monotonic(), 0), expire)
        try:
            while True:
                await self._event.wait()
                self._event.clear()
                if self._error is not None:
                    raise self._error
                batch, self._latest = self._latest, {}
                if batch:
                    yield batch
                if self.finished:
                    return
                if expired:
                    raise DeadlineExceeded
        finally:
            if timer is not None:
                timer.cancel()


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[Any]  # per choice: prompt text or token ids
    params: list[Any]  # per choice: SamplingParams
    priority: int
    deadline: float | None


@dataclass
class _Abort:
    engine_ids: list[str] = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine: Any, max_concurrent: int, max_queue: int) -> None:
        self.engine = engine
        self.admission = Admission(max_concurrent, max_queue)
        self._ids = itertools.count()
        self._commands: list[_Add | _Abort] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._routes: dict[str, tuple[RequestStream, int]] = {}  # loop thread only
        self._stats: Any = None  # the engine's latest EngineStats (a fresh object per call: safe to share)
        self.dead: BaseException | None = None
        self.on_death: Callable[[], None] | None = None  # called on the event loop once the loop thread died
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event-loop side --------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="deepfleet-engine", daemon=True)
        self._thread.start()

    async def submit(
        self, prompts: list[Any], params: list[Any], *, priority: int, deadline: float | None, queue_timeout: float
    ) -> RequestStream:
        """Admit and start one HTTP request. Raises QueueFull, TimeoutError (waited too long for a slot),
        ValueError (the engine refused the request) or EngineDead."""
        if self.dead is not None:
            raise EngineDead(str(self.dead))
        await self.admission.acquire(priority, queue_timeout)
        stream = RequestStream(f"req-{next(self._ids)}", len(prompts))
        try:
            self._send(_Add(stream, prompts, params, priority, deadline))
            await stream.accepted
        except BaseException:
            # Cancelled (client gone) or refused: the abort follows the add, so nothing stays in the engine.
            stream.closed = True
            self._send(_Abort(list(stream.engine_ids)))
            self.admission.release()
            raise
        return stream

    def close(self, stream: RequestStream) -> None:
        """End of the HTTP request: abort what is still running in the engine and free the slot."""
        if stream.closed:
            return
        stream.closed = True
        if not stream.finished:
            stream._fail(StreamAborted())
            if self.dead is None:
                self._send(_Abort(list(stream.engine_ids)))
        self.admission.release()

    def snapshot(self, ready: bool) -> LoadSnapshot:
        s = self._stats
        engine = (0, 0, 0.0, 0, 0, 0, 0, 0) if s is None else (
            s.num_running, s.num_waiting, s.kv_cache_usage, s.prefix_cache_queries, s.prefix_cache_hits,
            s.num_preemptions, s.prompt_tokens_total, s.generation_tokens_total)
        return LoadSnapshot(self.admission.active, self.admission.queued, *engine, ready=ready)

    async def stop(self) -> None:
        """Abort whatever is left and stop the loop thread."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    def _send(self, command: _Add | _Abort) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def _dispatch(self, batch: list[tuple[RequestStream, int, Any]]) -> None:
        for stream, index, output in batch:
            if not stream.closed:
                stream._deliver(index, output)

    # ---- loop thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self._refresh_stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._refresh_stats()
                self._publish(outputs)
        except BaseException as exc:  # a broken engine must not leave clients hanging
            log.exception("engine loop died")
            self.dead = exc
        finally:
            self._shutdown()
            if self.dead is not None and self.on_death is not None:
                self._call(self.on_death)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for command in commands:
            if isinstance(command, _Abort):
                self._abort(command.engine_ids)
            else:
                self._add(command)

    def _add(self, c: _Add) -> None:
        added: list[str] = []
        try:
            for i, (prompt, params) in enumerate(zip(c.prompts, c.params, strict=True)):
                engine_id = c.stream.engine_ids[i]
                self.engine.add_request(engine_id, prompt, params, priority=c.priority, deadline=c.deadline)
                self._routes[engine_id] = (c.stream, i)
                added.append(engine_id)
        except ValueError as exc:
            self._abort(added)
            self._call(c.stream._fail, exc)
            return
        self._call(lambda: c.stream.accepted.done() or c.stream.accepted.set_result(None))

    def _abort(self, engine_ids: list[str]) -> None:
        for engine_id in engine_ids:
            if self._routes.pop(engine_id, None) is not None:
                self.engine.abort_request(engine_id)

    def _publish(self, outputs: list[Any]) -> None:
        batch = []
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:  # aborted meanwhile
                continue
            if output.finished:
                del self._routes[output.request_id]
            batch.append((route[0], route[1], output))
        if batch:
            self._call(self._dispatch, batch)

    def _refresh_stats(self) -> None:
        self._stats = self.engine.stats()

    def _shutdown(self) -> None:
        """Loop thread is leaving: abort what the engine still holds and fail every open stream."""
        with self._lock:
            pending, self._commands = self._commands, []
        reason = EngineDead(f"engine stopped: {self.dead}" if self.dead else "server shutting down")
        streams = {route[0] for route in self._routes.values()}
        streams.update(c.stream for c in pending if isinstance(c, _Add))
        if self.dead is None:
            self._abort(list(self._routes))
            self._refresh_stats()
        self._routes.clear()
        for stream in streams:
            self._call(stream._fail, reason)

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # event loop already closed at interpreter shutdown
            pass
