"""The engine in a child process of its own (the split vLLM's V1 engine core makes): the HTTP event loop and the
engine's Python work (scheduling, sampling, detokenizing, kernel launches) no longer take turns on one GIL, which
at a few hundred streams held the engine to about half its offline throughput (bench/RESULTS.md).

Commands go down a multiprocessing queue (its feeder thread pickles, so the event loop never blocks on a full
pipe); events come up a pipe that the event loop reads whenever it holds data. Outputs cross as deltas: the
engine's RequestOutput is cumulative (the whole text and token list every step), this side appends the deltas to
its own copy.

With several API processes (`api_processes`, server/api_processes.py) the commands of all of them share the queue
and each has its own event pipe: the child routes outputs and answers by the request id's prefix ("2:req-7").

The child ignores SIGINT/SIGTERM (systemd and terminals signal the whole group): the server drains, then stops
it. It exits when the server process is gone, and the server exits (status 1) when the child dies.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepfleet.engine.errors import StartupError
from deepfleet.engine.outputs import CompletionOutput, RequestOutput
from deepfleet.server.engine_loop import Abort, Accepted, Add, Died, Refused, Stepped, describe, run_engine_loop

log = logging.getLogger(__name__)

_PIPE_BYTES = 1 << 20  # an event pipe's buffer (Linux's default 64 KiB holds ~5 steps of 256 streams' deltas)
_PARENT_CHECK_S = 1.0  # how often an idle child looks whether the server process is still there
_STOP_TIMEOUT_S = 30.0


@dataclass
class _Loaded:
    tokenizer: Any
    max_model_len: int
    max_num_seqs: int


# What one engine request gained in a step (its RequestOutput minus what was sent before) crosses the pipe as a plain
# tuple, its logprob entries as (token_id, logprob, top_logprobs) tuples: pickling 256 dataclass deltas a step cost
# the engine 0.44 ms and the server's reader thread 0.89 ms of GIL time, tuples 0.09 and 0.13 ms (bench/RESULTS.md).
# Its fields, in order: request_id, text, token_ids, logprobs, finish_reason, stop_reason, finished,
# num_cached_tokens, prompt_logprobs (sent once, with the request's first delta).


def _aborted(engine_id: str) -> tuple:
    return (engine_id, "", [], None, "abort", None, True, 0, None)


class _Sent:
    """How much of a request's cumulative output went out already (slots: read and set 256 times a step)."""

    __slots__ = ("chars", "tokens", "logprobs", "prompt_logprobs")

    def __init__(self) -> None:
        self.chars = self.tokens = self.logprobs = 0
        self.prompt_logprobs = False  # sent already


class _DeltaEncoder:
    """Child side: cumulative outputs -> deltas."""

    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}
        self._ended: list[str] = []  # aborted since the last report: the server side drops its copies

    def forget(self, engine_ids: list[str]) -> None:
        self._ended.extend(e for e in engine_ids if self._sent.pop(e, None) is not None)

    def encode(self, outputs: list[Any]) -> list[tuple]:
        deltas = [_aborted(e) for e in self._ended]
        self._ended = []
        sent = self._sent
        for out in outputs:
            c, request_id = out.outputs[0], out.request_id
            s = sent.get(request_id)
            if s is None:
                s = sent[request_id] = _Sent()
            logprobs = None
            if c.logprobs is not None:
                logprobs = [(e["token_id"], e["logprob"], e["top_logprobs"]) for e in c.logprobs[s.logprobs:]]
                s.logprobs = len(c.logprobs)
            prompt = None
            if not s.prompt_logprobs and out.prompt_logprobs is not None:
                prompt, s.prompt_logprobs = out.prompt_logprobs, True
            token_ids, text_len = c.token_ids, c.text_len
            deltas.append((request_id, c.text_since(s.chars, text_len), token_ids[s.tokens:], logprobs,
                           c.finish_reason, c.stop_reason, out.finished, out.num_cached_tokens, prompt))
            s.chars, s.tokens = text_len, len(token_ids)
            if out.finished:
                del sent[request_id]
        return deltas


class _DeltaDecoder:
    """Server side (the reader thread only): deltas -> cumulative RequestOutput objects, as the engine in a thread
    would give them."""

    def __init__(self) -> None:
        self._outputs: dict[str, Any] = {}

    def decode(self, deltas: list[tuple]) -> list[Any]:
        outputs = []
        for request_id, text, token_ids, logprobs, finish_reason, stop_reason, finished, cached, prompt in deltas:
            out = self._outputs.get(request_id)
            if out is None:
                out = self._outputs[request_id] = RequestOutput(
                    request_id, None, [], [CompletionOutput(0, "", [], None, None)], False)
            if finished:
                del self._outputs[request_id]
            c = out.outputs[0]
            c.extend_text(text)
            c.token_ids.extend(token_ids)
            if logprobs is not None:
                c.logprobs = c.logprobs if c.logprobs is not None else []
                c.logprobs.extend({"token_id": t, "logprob": lp, "top_logprobs": tops} for t, lp, tops in logprobs)
            c.finish_reason, c.stop_reason = finish_reason, stop_reason
            out.finished, out.num_cached_tokens = finished, cached
            if prompt is not None:
                out.prompt_logprobs = prompt
            outputs.append(out)
        return outputs


_STOP = "stop"


@dataclass
class Detach:
    """An API process stops (api_processes > 1): no more events to it; its requests still running are aborted."""

    owner: str


def owner_of(request_id: str) -> str:
    """The API process that sent a request: the id's prefix up to ':' (api_processes > 1), "" with one process."""
    return request_id.partition(":")[0] if ":" in request_id else ""


class _Channels:
    """Child side: the event pipe of each API process (one, or `server.api_processes`), keyed by the id prefix its
    requests carry. A Stepped event is split by owner (every owner gets the stats); outputs of an owner that is
    gone or detached become aborts of the next receive. Once every pipe is gone there is nobody to serve: the
    BrokenPipeError ends the engine loop."""

    def __init__(self, pipes: dict[str, Any]) -> None:
        self._pipes = pipes
        self._split = len(pipes) > 1  # by owner, also once only one is left
        self._lock = threading.Lock()  # the tensor-parallel watchdog may report from its own thread
        self.orphans: list[str] = []  # engine ids of requests whose API process is gone

    def drop(self, owner: str) -> None:
        pipe = self._pipes.pop(owner, None)
        if pipe is not None:
            pipe.close()

    def _send(self, owner: str, event: Any) -> None:
        try:
            self._pipes[owner].send(event)
        except (BrokenPipeError, ConnectionResetError, OSError):
            log.warning("API process %r is gone: its requests are aborted", owner or 0)
            self.drop(owner)

    def send(self, event: Any) -> None:
        with self._lock:
            if isinstance(event, Stepped) and self._split:
                parts: dict[str, list] = {owner: [] for owner in self._pipes}
                for delta in event.outputs:
                    part = parts.get(owner_of(delta[0]))
                    if part is not None:
                        part.append(delta)
                    elif not delta[6]:  # still running, for nobody
                        self.orphans.append(delta[0])
                for owner, part in parts.items():
                    self._send(owner, Stepped(part, event.stats))
            elif isinstance(event, Accepted | Refused) and self._split:
                if (owner := owner_of(event.request_id)) in self._pipes:
                    self._send(owner, event)
            else:  # one API process: everything is its; _Loaded and Died: every API process's
                for owner in list(self._pipes):
                    self._send(owner, event)
            if not self._pipes:
                raise BrokenPipeError("no API process left")


def _child_main(factory: Callable[[Any], Any], settings: Any, commands: Any, pipes: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    name_process("deepfleet-eng")
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    parent = os.getppid()
    channels = _Channels(pipes)
    try:
        engine = factory(settings)
    except StartupError as exc:  # a setting that cannot work here: the message says which, no trace needed
        log.error("engine failed to load: %s", exc)
        channels.send(Died(describe(exc)))
        return
    except BaseException as exc:
        log.exception("engine failed to load")
        channels.send(Died(describe(exc)))
        return

    def die(message: str) -> None:  # a tensor-parallel worker died or hung: report it and end now
        channels.send(Died(message))
        os._exit(1)

    if hasattr(getattr(engine, "runner", None), "on_fatal"):
        engine.runner.on_fatal = die
    channels.send(_Loaded(engine.tokenizer, engine.max_model_len, engine.max_num_seqs))
    encoder = _DeltaEncoder()

    def receive(block: bool) -> list | None:
        got = []
        if channels.orphans:
            got.append(Abort(channels.orphans))
            encoder.forget(channels.orphans)
            channels.orphans = []
        while True:
            try:
                item = commands.get(timeout=_PARENT_CHECK_S) if block and not got else commands.get_nowait()
            except queue.Empty:
                if got or not block:
                    return got
                if os.getppid() != parent:  # the server process is gone (killed): nobody to serve
                    return None
                continue
            if item == _STOP:
                return None
            if isinstance(item, Detach):
                channels.drop(item.owner)
                continue
            if isinstance(item, Abort):
                encoder.forget(item.engine_ids)
            got.append(item)

    def report(event: Any) -> None:
        if isinstance(event, Stepped):
            event = Stepped(encoder.encode(event.outputs), event.stats)
        channels.send(event)

    try:
        run_engine_loop(engine, receive, report)
    except (BrokenPipeError, EOFError):  # the server process is gone: nobody to report to
        return
    except BaseException as exc:
        log.exception("engine loop died")
        try:
            channels.send(Died(describe(exc)))
        except BrokenPipeError:
            pass
        os._exit(1)  # no interpreter clean-up: a broken CUDA context can hang it


def name_process(name: str) -> None:
    """The name `ps`, `top` and the benchmarks show (Linux: at most 15 characters); elsewhere nothing."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


_READ_BYTES = 1 << 20


def _frames(unread: bytearray) -> list[Any]:
    """The whole messages at the start of `unread` (taken out of it), framed as multiprocessing's Connection.send
    writes them: a 4-byte big-endian signed length (-1: an 8-byte length follows), then the pickle. Unpickled from a
    view (no copy per message), the consumed bytes cut off once."""
    events, pos = [], 0
    with memoryview(unread) as view:
        while len(unread) - pos >= 4:
            (size,), start = struct.unpack_from("!i", unread, pos), pos + 4
            if size == -1:
                if len(unread) - pos < 12:
                    break
                (size,), start = struct.unpack_from("!Q", unread, pos + 4), pos + 12
            if len(unread) < start + size:
                break
            events.append(pickle.loads(view[start : start + size]))
            pos = start + size
    del unread[:pos]
    return events


def event_pipe(ctx: Any) -> tuple[Any, Any]:
    """(read end, write end) of an engine event pipe, its buffer widened to _PIPE_BYTES where the OS allows: an API
    process busy for a moment then falls a few hundred steps behind before the engine's send blocks, not five."""
    events, child_events = ctx.Pipe(duplex=False)
    try:
        fcntl.fcntl(child_events.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except OSError:  # over the user's pipe-buffer quota (or above pipe-max-size unprivileged): the default stays
        pass
    return events, child_events


def spawn_engine(ctx: Any, factory: Callable[[Any], Any], settings: Any, commands: Any,
                 pipes: dict[str, Any]) -> Any:
    """Start the engine process: it reads `commands` and reports to `pipes` (id prefix -> write end)."""
    process = ctx.Process(target=_child_main, args=(factory, settings, commands, pipes), name="deepfleet-engine",
                          daemon=True)
    process.start()
    return process


def stop_engine(process: Any, commands: Any) -> None:
    """Blocking: the engine aborts what is left, reports, and exits (killed if it does not in time)."""
    if process.is_alive():
        commands.put(_STOP)
    process.join(_STOP_TIMEOUT_S)
    if process.is_alive():
        log.warning("engine process did not stop in %.0f s: killed", _STOP_TIMEOUT_S)
        process.kill()
        process.join()


def _first_event(events: Any, process: Any | None) -> _Loaded:
    """Blocking: the engine's first event, its model loaded; raises StartupError with its reason."""
    try:
        first = events.recv()
    except EOFError:
        if process is None:
            raise RuntimeError("engine process exited while loading") from None
        process.join()
        raise RuntimeError(f"engine process exited with status {process.exitcode} while loading") from None
    if isinstance(first, Died):
        if process is not None:
            process.join()
        raise StartupError(first.message)
    return first


class ProcessDriver:
    """API side of the engine process: send commands, report its events. With one API process that process
    spawns the engine (`launch`) and stops it; with several (server/api_processes.py) each `connect`s to the
    engine the supervisor spawned, its requests' ids prefixed with `owner`, and only detaches on stop."""

    def __init__(self, process: Any | None, commands: Any, events: Any, loaded: _Loaded, owner: str = "") -> None:
        self._process = process  # None: the supervisor owns the engine process
        self._commands = commands
        self._events = events
        self.owner = owner
        self.tokenizer = loaded.tokenizer
        self.max_model_len = loaded.max_model_len
        self.max_num_seqs = loaded.max_num_seqs
        self._decoder = _DeltaDecoder()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._report: Callable[[Any], None] | None = None
        self._unread = bytearray()  # read from the pipe, not yet a whole message
        self._drained = threading.Event()  # the pipe was read to its end

    @classmethod
    def launch(cls, factory: Callable[[Any], Any], settings: Any) -> ProcessDriver:
        """Blocking: spawn the engine process and wait until its model is loaded. `factory` must be picklable
        (a module-level function). Raises RuntimeError with the child's reason when loading fails."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        commands = ctx.Queue()
        events, child_events = event_pipe(ctx)
        process = spawn_engine(ctx, factory, settings, commands, {"": child_events})
        child_events.close()
        return cls(process, commands, events, _first_event(events, process))

    @classmethod
    def connect(cls, commands: Any, events: Any, owner: str) -> ProcessDriver:
        """Blocking: wait until the engine the supervisor spawned has loaded its model (same errors as launch)."""
        return cls(None, commands, events, _first_event(events, None), owner)

    @property
    def pid(self) -> int:
        return self._process.pid

    def start(self, report: Callable[[Any], None]) -> None:
        """`report` is called in the event loop with every event: the pipe is read there, without blocking, whenever
        it holds data. (A reader thread had to win the GIL back from the busy event loop for every read: at 256
        streams it fell behind and the full pipe held the engine back; bench/RESULTS.md.)"""
        self._loop = asyncio.get_running_loop()
        self._report = report
        os.set_blocking(self._events.fileno(), False)  # (uvloop's add_reader makes it so anyway)
        self._loop.add_reader(self._events.fileno(), self._read)

    def _read(self) -> None:
        fd, ended = self._events.fileno(), False
        try:
            while chunk := os.read(fd, _READ_BYTES):
                self._unread += chunk
            ended = True  # end of file: the engine process closed its end (exited)
        except BlockingIOError:  # all read that was there
            pass
        except OSError:
            ended = True
        for event in _frames(self._unread):
            if isinstance(event, Stepped):
                event = Stepped(self._decoder.decode(event.outputs), event.stats)
            self._report(event)
        if ended:
            self._loop.remove_reader(fd)
            self._drained.set()
            if not self._stopping:
                self._loop.run_in_executor(None, self._report_exit)

    def _report_exit(self) -> None:
        if self._process is None:  # the supervisor's child: it knows the status
            self._report(Died("engine process exited"))
            return
        self._process.join(5)
        self._report(Died(f"engine process exited with status {self._process.exitcode}"))

    def send(self, command: Add | Abort) -> None:
        self._commands.put(command)

    def stop(self) -> None:
        """Blocking: the child aborts what is left, reports, and exits (killed if it does not in time). Connected
        to the supervisor's engine: it aborts this process's requests and closes its pipe; the engine goes on."""
        self._stopping = True
        if self._process is None:
            self._commands.put(Detach(self.owner))
            if self._loop is not None:
                self._drained.wait(_STOP_TIMEOUT_S)
            self._commands.cancel_join_thread()
            return
        stop_engine(self._process, self._commands)
        if self._loop is not None:
            self._drained.wait(_STOP_TIMEOUT_S)  # the events it reported on its way out are in
        self._commands.cancel_join_thread()  # a command the stopped child never read must not block our exit
