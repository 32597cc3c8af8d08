"""What the batcher needs from a backend: run one assembled batch, synchronously (it is called from
the batcher's worker threads, so the event loop keeps accepting requests meanwhile)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
