"""The loop that owns the (single-threaded) engine, and the driver that runs it in a thread of the server process.

The loop applies queued add/abort commands, steps the engine while it has unfinished requests, and reports what
happened as events. Where it runs is the driver's business: `ThreadDriver` here (tests with fake engines, CPU
debugging), `deepfleet.server.engine_process.ProcessDriver` in a child process of its own (the default). Both
take the same commands and report the same events, so the event-loop side (`AsyncEngine`) does not know which.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from deepfleet.engine.errors import SlotsBusy

log = logging.getLogger(__name__)


# ---- commands (server -> engine) -----------------------------------------------------------------------------------


@dataclass
class Add:
    request_id: str
    engine_ids: list[str]  # one engine request per choice
    prompts: list[Any]  # per choice: prompt text or token ids
    params: list[Any]  # per choice: SamplingParams
    priority: int
    deadline: float | None
    lora: str | None = None  # the LoRA adapter serving every choice; None: the base model


@dataclass
class Abort:
    engine_ids: list[str]


@dataclass
class LoadAdapter:
    request_id: str
    name: str
    path: str


@dataclass
class UnloadAdapter:
    request_id: str
    name: str


# ---- events (engine -> server) -------------------------------------------------------------------------------------


@dataclass
class Accepted:
    request_id: str


@dataclass
class Refused:
    request_id: str
    message: str  # the engine's ValueError (the request is invalid for this engine) or SlotsBusy
    busy: bool = False  # SlotsBusy: refused for now, the same request may be served later


@dataclass
class Stepped:
    outputs: list[Any]  # RequestOutput of the requests that advanced or ended
    stats: Any  # EngineStats after the step


@dataclass
class Died:
    message: str


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_engine_loop(engine: Any, receive: Callable[[bool], list | None], report: Callable[[Any], None]) -> None:
    """Until `receive(block)` returns None: apply its commands, then step while requests are unfinished (it blocks
    only while the engine is idle). On the way out, whatever the engine still holds is aborted. An exception from
    the engine propagates: the driver reports the death."""
    live: set[str] = set()  # engine ids added and not yet finished or aborted

    def abort(engine_ids: list[str]) -> None:
        for engine_id in engine_ids:
            if engine_id in live:
                live.discard(engine_id)
                engine.abort_request(engine_id)

    def admit(c: Add) -> None:
        added: list[str] = []
        try:
            for engine_id, prompt, params in zip(c.engine_ids, c.prompts, c.params, strict=True):
                lora = {"lora": c.lora} if c.lora is not None else {}
                engine.add_request(engine_id, prompt, params, priority=c.priority, deadline=c.deadline, **lora)
                added.append(engine_id)
                live.add(engine_id)
        except (ValueError, SlotsBusy) as exc:
            abort(added)
            report(Refused(c.request_id, str(exc), busy=isinstance(exc, SlotsBusy)))
            return
        report(Accepted(c.request_id))

    # Requests whose grammars (structured output) are compiling in worker threads: admitted once compiled, or
    # refused once invalid or past the compile timeout; the engine keeps stepping the others meanwhile.
    compiling: list[tuple[Add, list[Any]]] = []
    processors = getattr(engine, "logits_processors", None)

    def add(c: Add) -> None:
        specs = {p.structured for p in c.params if getattr(p, "structured", None) is not None}
        if not specs or processors is None:
            return admit(c)
        try:
            for params in c.params:
                processors.check(params)
            compiling.append((c, [processors.submit(spec) for spec in specs]))
        except ValueError as exc:
            report(Refused(c.request_id, str(exc)))

    def admit_compiled() -> None:
        for entry in list(compiling):
            if all(f.done() or processors.grammars.expired(f) for f in entry[1]):
                compiling.remove(entry)
                admit(entry[0])  # add_request takes the grammar, or refuses with why it has none

    def forget_compiling(engine_ids: list[str]) -> None:
        gone = set(engine_ids)
        compiling[:] = [e for e in compiling if not gone & set(e[0].engine_ids)]

    def adapter(c: LoadAdapter | UnloadAdapter) -> None:
        try:
            if not hasattr(engine, "load_lora_adapter"):
                raise ValueError("lora_name: this engine serves no LoRA adapters")
            if isinstance(c, LoadAdapter):
                engine.load_lora_adapter(c.name, c.path)
            else:
                engine.unload_lora_adapter(c.name)
        except ValueError as exc:
            report(Refused(c.request_id, str(exc)))
            return
        report(Accepted(c.request_id))

    while (commands := receive(not engine.has_unfinished_requests() and not compiling)) is not None:
        for command in commands:
            if isinstance(command, Abort):
                forget_compiling(command.engine_ids)
                abort(command.engine_ids)
            elif isinstance(command, LoadAdapter | UnloadAdapter):
                adapter(command)
            else:
                add(command)
        if compiling:
            if not engine.has_unfinished_requests():  # nothing else to do: wait a little for a compile
                futures.wait([f for e in compiling for f in e[1]], timeout=0.01, return_when=futures.FIRST_COMPLETED)
            admit_compiled()
        outputs = engine.step() if engine.has_unfinished_requests() else []
        live.difference_update(o.request_id for o in outputs if o.finished)
        # idle wake-ups report too: the stats then show the KV blocks an abort freed
        report(Stepped(outputs, engine.stats()))
    abort(list(live))
    report(Stepped([], engine.stats()))


class ThreadDriver:
    """Runs the engine loop in a thread of this process (the engine's Python work then shares the GIL with the
    HTTP event loop: fine for fakes and CPU, slower under load than ProcessDriver)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.max_num_seqs = engine.max_num_seqs
        self._commands: list[Add | Abort] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self, report: Callable[[Any], None]) -> None:
        """`report` is called in the loop thread with every event."""

        def run() -> None:
            try:
                run_engine_loop(self.engine, self._receive, report)
            except BaseException as exc:  # a broken engine must not leave clients hanging
                log.exception("engine loop died")
                report(Died(describe(exc)))

        self._thread = threading.Thread(target=run, name="deepfleet-engine", daemon=True)
        self._thread.start()

    def send(self, command: Add | Abort) -> None:
        with self._lock:
            self._commands.append(command)
        self._wake.set()

    def stop(self) -> None:
        """Blocking: the loop aborts what is left and ends."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _receive(self, block: bool) -> list[Add | Abort] | None:
        if block:
            self._wake.wait()
        self._wake.clear()
        if self._stop:
            return None
        with self._lock:
            commands, self._commands = self._commands, []
        return commands
