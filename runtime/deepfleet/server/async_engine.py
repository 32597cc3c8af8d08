"""The asyncio face of the engine.

The engine itself runs elsewhere — in a child process of its own (`engine_process.ProcessDriver`, the default) or
in a thread of this process (`engine_loop.ThreadDriver`) — and reports each step's outputs as one event, handed
to the event loop with one `call_soon_threadsafe`. Each HTTP request gets a `RequestStream` holding only the
*latest* cumulative output per choice, so a slow reader costs no memory and never stalls the engine. Admission
(bounded, by priority) happens before the engine sees a request; closing a stream early aborts it in the engine,
which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from deepfleet.engine.errors import SlotsBusy
from deepfleet.server.admission import Admission
from deepfleet.server.engine_loop import Abort, Accepted, Add, Died, LoadAdapter, Refused, Stepped, UnloadAdapter
from deepfleet.server.metrics import LoadSnapshot

log = logging.getLogger(__name__)


class EngineDead(RuntimeError):
    """The engine stopped (a step raised, its process died, or the server shut down)."""


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


class AsyncEngine:
    def __init__(self, driver: Any, max_concurrent: int, max_queue: int, id_prefix: str = "",
                 board: Any = None) -> None:
        """`driver`: ProcessDriver or ThreadDriver (start(report), send(command), stop()). `id_prefix`: names this
        API process in its requests' ids, `board` (api_processes.Board) its admission counts, where several API
        processes share one engine."""
        self.driver = driver
        self.admission = Admission(max_concurrent, max_queue, None if board is None else board.publish)
        self._id_prefix = id_prefix
        self._board = board
        self._ids = itertools.count()
        self._pending: dict[str, RequestStream] = {}  # request id -> stream the engine has not accepted yet
        self._routes: dict[str, tuple[RequestStream, int]] = {}  # engine id -> (stream, choice index)
        self._adapter_calls: dict[str, asyncio.Future] = {}  # load/unload id -> its answer
        self._stats: Any = None  # the engine's latest EngineStats (a fresh object per step: safe to share)
        self.dead: BaseException | None = None
        self.on_death: Callable[[], None] | None = None  # called once the engine died
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.driver.start(self._report)

    async def submit(
        self, prompts: list[Any], params: list[Any], *, priority: int, deadline: float | None, queue_timeout: float,
        lora: str | None = None,
    ) -> RequestStream:
        """Admit and start one HTTP request. Raises QueueFull, TimeoutError (waited too long for a slot),
        ValueError (the engine refused the request), SlotsBusy (refused for now) or EngineDead."""
        if self.dead is not None:
            raise EngineDead(str(self.dead))
        await self.admission.acquire(priority, queue_timeout)
        stream = RequestStream(f"{self._id_prefix}req-{next(self._ids)}", len(prompts))
        self._pending[stream.request_id] = stream
        self._routes.update((engine_id, (stream, i)) for i, engine_id in enumerate(stream.engine_ids))
        try:
            self.driver.send(Add(stream.request_id, stream.engine_ids, prompts, params, priority, deadline, lora))
            await stream.accepted
        except BaseException:
            # Cancelled (client gone) or refused: the abort follows the add, so nothing stays in the engine.
            stream.closed = True
            self._forget(stream)
            if self.dead is None:
                self.driver.send(Abort(list(stream.engine_ids)))
            self.admission.release()
            raise
        return stream

    async def adapter(self, command: LoadAdapter | UnloadAdapter) -> None:
        """Load or unload a LoRA adapter in the engine (between two steps). Raises ValueError (refused, with the
        engine's reason) or EngineDead."""
        if self.dead is not None:
            raise EngineDead(str(self.dead))
        command.request_id = f"{self._id_prefix}adapter-{next(self._ids)}"
        answer = self._loop.create_future()
        self._adapter_calls[command.request_id] = answer
        try:
            self.driver.send(command)
            await answer
        finally:
            self._adapter_calls.pop(command.request_id, None)

    def close(self, stream: RequestStream) -> None:
        """End of the HTTP request: abort what is still running in the engine and free the slot."""
        if stream.closed:
            return
        stream.closed = True
        if not stream.finished:
            stream._fail(StreamAborted())
            self._forget(stream)
            if self.dead is None:
                self.driver.send(Abort(list(stream.engine_ids)))
        self.admission.release()

    def snapshot(self, ready: bool) -> LoadSnapshot:
        s = self._stats
        engine = (0, 0, 0.0, 0, 0, 0, 0, 0) if s is None else (
            s.num_running, s.num_waiting, s.kv_cache_usage, s.prefix_cache_queries, s.prefix_cache_hits,
            s.num_preemptions, s.prompt_tokens_total, s.generation_tokens_total)
        a = self.admission
        admitted, queued = (a.active, a.queued) if self._board is None else self._board.load()
        return LoadSnapshot(admitted, queued, *engine, ready=ready,
                            spec_decode=None if s is None else s.spec_decode, lora=None if s is None else s.lora)

    async def stop(self) -> None:
        """Stop the engine (it aborts whatever is left) and fail the streams still open."""
        await asyncio.to_thread(self.driver.stop)
        await asyncio.sleep(0)  # let the events the engine reported on its way out arrive first
        self._fail_all(EngineDead("server shutting down"))

    def _forget(self, stream: RequestStream) -> None:
        self._pending.pop(stream.request_id, None)
        for engine_id in stream.engine_ids:
            self._routes.pop(engine_id, None)

    def _fail_all(self, reason: BaseException) -> None:
        streams = {route[0] for route in self._routes.values()} | set(self._pending.values())
        self._routes.clear()
        self._pending.clear()
        for stream in streams:
            stream._fail(reason)
        for answer in self._adapter_calls.values():
            if not answer.done():
                answer.set_exception(reason)

    def _report(self, event: Any) -> None:
        """Called by the driver (in its thread) with each engine event."""
        try:
            self._loop.call_soon_threadsafe(self._handle, event)
        except RuntimeError:  # event loop already closed at interpreter shutdown
            pass

    def _handle(self, event: Any) -> None:
        if isinstance(event, Stepped):
            self._stats = event.stats
            for output in event.outputs:
                route = self._routes.get(output.request_id)
                if route is None:  # aborted meanwhile
                    continue
                if output.finished:
                    del self._routes[output.request_id]
                stream, index = route
                if not stream.closed:
                    stream._deliver(index, output)
        elif isinstance(event, Accepted | Refused) and event.request_id in self._adapter_calls:
            answer = self._adapter_calls.pop(event.request_id)
            if answer.done():
                pass
            elif isinstance(event, Accepted):
                answer.set_result(None)
            else:
                answer.set_exception(ValueError(event.message))
        elif isinstance(event, Accepted):
            stream = self._pending.pop(event.request_id, None)
            if stream is not None and not stream.accepted.done():
                stream.accepted.set_result(None)
        elif isinstance(event, Refused):
            stream = self._pending.pop(event.request_id, None)
            if stream is not None:
                self._forget(stream)
                stream._fail(SlotsBusy(event.message) if event.busy else ValueError(event.message))
        elif isinstance(event, Died) and self.dead is None:
            log.error("engine died: %s", event.message)
            self.dead = EngineDead(event.message)
            self._fail_all(EngineDead(f"engine stopped: {event.message}"))
            if self.on_death is not None:
                self.on_death()
