"""The benchmarks' wait for a server they started: /readyz answering 200 while the process lives."""

from __future__ import annotations

import subprocess
import time


def wait_ready(port: int, proc: subprocess.Popen, timeout: float | None = None, interval: float = 0.5) -> bool:
    """True once http://127.0.0.1:`port`/readyz answers 200; False when `proc` exited first or `timeout` s
    (None: no limit) passed."""
    import httpx

    end = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None and (end is None or time.monotonic() < end):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(interval)
    return False
