"""Several API server processes in front of the one engine process (`api_processes` > 1; vLLM's
--api-server-count, SGLang's tokenizer-manager split): one Python process cannot emit the SSE events of a fast
engine at hundreds of streams (bench/RESULTS.md, issue 12).

The `deepfleet serve` process becomes a supervisor: it binds one listening socket per API process on the same
address (SO_REUSEPORT: the kernel spreads new connections over them), spawns the engine process and the API
processes, and waits. Each API process runs the whole app (admission, SSE, metrics) with its own event pipe from
the engine and shares the engine's command queue; its request ids carry its index ("2:req-7"), by which the engine
routes each step's outputs. State that would be wrong per process is shared or split:
  - admission: each process holds max_concurrent / N slots and max_queue / N queue places (a request waits in its
    own process's queue); the admitted/queued gauges add up every process's counts (`Board`);
  - metrics: prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, as vLLM): counters and histograms
    add up over the processes whichever one is scraped;
  - /readyz: ready only while every API process is (and the engine is alive);
  - auth (per-process rate limits), LoRA (per-process adapter lists) and self-rotated audit logs are refused with
    several processes (config.py), and the default is then 1.
SIGTERM/SIGINT: every process turns unready and the API processes drain (shutdown_grace_s), then the engine
stops. An API process that dies ends the server with status 1 after the others drained (systemd or the kubelet
restarts it); a dead engine ends every API process, as with one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from deepfleet import defaults
from deepfleet.server.config import ServeSettings
from deepfleet.server.engine_process import ProcessDriver, event_pipe, name_process, spawn_engine, stop_engine

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def gpu_visible() -> bool:
    """An NVIDIA GPU this process may use (device nodes present, not hidden by CUDA_VISIBLE_DEVICES), without
    importing torch: the API processes never load it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return any(name.startswith("nvidia") and name[6:].isdigit() for name in os.listdir("/dev"))


def count(settings: ServeSettings, cpus: int | None = None, gpu: bool | None = None) -> int:
    """`api_processes`, or its default for this host (see ServeSettings.api_processes)."""
    if settings.api_processes is not None:
        return settings.api_processes
    unsupported = (not settings.engine_process or settings.auth.enabled or settings.engine.enable_lora
                   or settings.engine.lora_modules or settings.audit.max_bytes is not None)
    on_cpu = settings.engine.device == "cpu" or not (gpu_visible() if gpu is None else gpu)
    if unsupported or on_cpu:
        return 1
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    return max(1, min(defaults.API_PROCESSES_MAX, cpus // defaults.CPUS_PER_API_PROCESS))


class Board:
    """Shared memory of the API processes: who is ready, and each one's admitted and queued requests."""

    def __init__(self, ctx: Any, n: int) -> None:
        self._ready = ctx.RawArray("b", n)
        self._counts = ctx.RawArray("q", 2 * n)
        self.index = 0  # set in each API process

    def publish(self, active: int, queued: int) -> None:
        self._counts[2 * self.index], self._counts[2 * self.index + 1] = active, queued

    def load(self) -> tuple[int, int]:
        counts = self._counts[:]
        return sum(counts[0::2]), sum(counts[1::2])

    def set_ready(self, ready: bool, index: int | None = None) -> None:
        self._ready[self.index if index is None else index] = ready

    def all_ready(self) -> bool:
        return all(self._ready)


@dataclass
class Peer:
    """What one API process needs to reach the shared engine."""

    index: int
    count: int
    commands: Any
    events: Any
    board: Board

    @property
    def owner(self) -> str:
        return str(self.index)

    def connect(self) -> ProcessDriver:
        return ProcessDriver.connect(self.commands, self.events, self.owner)

    def share(self, total: int) -> int:
        """This process's part of `total` (slots or queue places): the parts add up to it."""
        return total // self.count + (self.index < total % self.count)


def _listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sockets = []
    for _ in range(n):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        address = sock.getsockname()  # port 0: the others take the port the first one got
        sock.listen(2048)
        sockets.append(sock)
    return sockets


def _api_main(settings: ServeSettings, peer: Peer, sock: socket.socket) -> None:
    from deepfleet.server.app import create_app
    from deepfleet.server.lifecycle import serve

    name_process(f"deepfleet-api{peer.index}")
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s [api {peer.index}]: %(message)s")
    peer.board.index = peer.index
    sys.exit(serve(create_app(settings, peer=peer), settings, [sock]))


def supervise(settings: ServeSettings, engine_factory: Callable[[ServeSettings], Any], n: int) -> int:
    """Run the engine process and `n` API processes until SIGTERM/SIGINT (status 0) or a failure (status 1)."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="deepfleet-metrics-") as metrics_dir:
        os.environ[MULTIPROC_ENV] = metrics_dir  # read by prometheus_client when the API processes import it
        sockets = _listening_sockets(settings.host, settings.port, n)
        commands = ctx.Queue()
        pipes = [event_pipe(ctx) for _ in range(n)]
        board = Board(ctx, n)
        engine = spawn_engine(ctx, engine_factory, settings, commands, {str(k): w for k, (_, w) in enumerate(pipes)})
        apis = []
        for k, ((events, child_events), sock) in enumerate(zip(pipes, sockets, strict=True)):
            apis.append(ctx.Process(target=_api_main, name=f"deepfleet-api{k}", daemon=True,
                                    args=(settings, Peer(k, n, commands, events, board), sock)))
            apis[-1].start()
            child_events.close()  # the engine holds the write ends, each API process its read end and socket
            events.close()
            sock.close()
        log.info("serving on %s:%d with %d API processes (pids %s), engine pid %d", settings.host,
                 settings.port, n, ", ".join(str(p.pid) for p in apis), engine.pid)
        status = _wait(apis, board)
        stop_engine(engine, commands)
        commands.cancel_join_thread()
    del os.environ[MULTIPROC_ENV]
    return status


def _wait(apis: list[Any], board: Board) -> int:
    """Until every API process has exited: signals are passed on to them (they drain), and one that exits on its
    own makes the others drain too. The worst status comes back."""
    stopping = False

    def stop_all(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for k, api in enumerate(apis):
            board.set_ready(False, k)
            if api.exitcode is None:
                os.kill(api.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        live = list(apis)
        while live:
            wait([api.sentinel for api in live])
            for api in [a for a in live if a.exitcode is not None]:
                live.remove(api)
                # uvicorn re-raises the signal it drained on: ended by it, cleanly
                if api.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT):
                    status = 1
                if not stopping:
                    log.error("%s (pid %d) exited with status %s: stopping the server", api.name, api.pid,
                              api.exitcode)
                    status = 1
                    stop_all()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status
