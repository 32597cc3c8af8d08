"""What a watermarked request carries: the key and the two strengths. Validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_GAMMA = 0.25  # green share of the vocabulary (Kirchenbauer et al. use 0.25 and 0.5)
DEFAULT_DELTA = 2.0  # logit bias of green tokens
DEFAULT_Z_THRESHOLD = 4.0  # detector verdict: z above this reads as watermarked (one-sided p ~ 3e-5)


@dataclass(frozen=True)
class WatermarkConfig:
    key: str
    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError("watermark.key: must be a non-empty string")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 < self.gamma < 1:
            raise ValueError(f"watermark.gamma: must be in (0, 1), got {self.gamma!r}")
        if (isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not math.isfinite(self.delta)
                or self.delta < 0):
            raise ValueError(f"watermark.delta: must be a finite number >= 0, got {self.delta!r}")
