"""Running the server process: uvicorn with a graceful drain.

On SIGTERM (or SIGINT): /readyz turns 503 and new requests get 503 at once (`draining`), uvicorn closes the
listening socket, requests already accepted run to completion for up to `shutdown_grace_s`, then the engine
stops and the process exits. A model that fails to load, or an engine that dies, ends the process with status 1.
With `api_processes` > 1 this process supervises several such servers sharing one engine (api_processes.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from deepfleet.server import api_processes
from deepfleet.server.app import build_engine, create_app
from deepfleet.server.config import ServeSettings
from deepfleet.server.state import ServerState
from deepfleet.server.tls import uvicorn_options


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._state.draining = True
        super().handle_exit(sig, frame)


def run(settings: ServeSettings, engine_factory: Callable[[ServeSettings], Any] = build_engine) -> int:
    """Serve until SIGTERM/SIGINT (status 0) or a fatal engine error (status 1)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    n = api_processes.count(settings)
    if n > 1:
        return api_processes.supervise(settings, engine_factory, n)
    return serve(create_app(settings, engine_factory), settings)


def serve(app: Any, settings: ServeSettings, sockets: list[socket.socket] | None = None) -> int:
    """Run `app` under uvicorn on settings' host and port (or on `sockets`, bound already) until SIGTERM/SIGINT
    (status 0) or a fatal engine error (status 1)."""
    state: ServerState = app.state.server
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",  # one line per request is too much at production rates
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        # uvicorn's 5 s default races with clients and load balancers reusing an idle connection (reset
        # mid-request); proxies keep theirs for 60 s, so the server must keep its own longer.
        timeout_keep_alive=settings.keep_alive_s,
        lifespan="on",
        **uvicorn_options(settings.tls),  # HTTPS, TLS 1.3 only, when tls.cert_file is set
    )
    server = _DrainingServer(config, state)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    server.run(sockets=sockets)
    return 0 if state.alive else 1
