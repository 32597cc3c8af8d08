"""Load-based batch-size controller from the source documents: below 30 % load grow the target batch
size ×1.5, above 80 % shrink it ×0.7, always within [min_batch_size, max_batch_size].

"Load" here is the backend's busy fraction over the last control interval (execution time summed over
instances / (interval × instances)) — the CPU/GPU-utilisation analogue the batcher can measure itself.
Whether this helps is measured in bench/batcher.py, not assumed."""

from __future__ import annotations

import math

GROW_BELOW = 0.30
SHRINK_ABOVE = 0.80
GROW_FACTOR = 1.5
SHRINK_FACTOR = 0.7


class AdaptiveBatchSize:
    def __init__(self, min_batch_size: int, max_batch_size: int, initial: int | None = None):
        if not 1 <= min_batch_size <= max_batch_size:
            raise ValueError(f"need 1 <= min_batch_size ({min_batch_size}) <= max_batch_size ({max_batch_size})")
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.target = max_batch_size if initial is None else self._clamp(initial)

    def _clamp(self, size: int) -> int:
        return max(self.min_batch_size, min(self.max_batch_size, size))

    def observe(self, load: float) -> int:
        """Feed one interval's load (0..1); returns the new target batch size."""
        if load < GROW_BELOW:
            # ceil so that a target of 1 can still grow (1 × 1.5 would floor back to 1)
            self.target = self._clamp(math.ceil(self.target * GROW_FACTOR))
        elif load > SHRINK_ABOVE:
            self.target = self._clamp(math.floor(self.target * SHRINK_FACTOR))
        return self.target


class LoadMeter:
    """Accumulates backend busy time and turns it into a load figure once per interval."""

    def __init__(self, interval_s: float, instances: int, now: float):
        self.interval_s = interval_s
        self.instances = instances
        self._window_start = now
        self._busy = 0.0

    def add_busy(self, seconds: float) -> None:
        self._busy += seconds

    def poll(self, now: float) -> float | None:
        """The load of the window ending now if a full interval has passed, else None."""
        elapsed = now - self._window_start
        if elapsed < self.interval_s:
            return None
        load = min(1.0, self._busy / (elapsed * self.instances))
        self._window_start, self._busy = now, 0.0
        return load
