"""Per-principal token buckets: `limit` requests per minute, refilled continuously, bursts up to `limit`.
Bounded memory: the least recently seen principals are forgotten beyond MAX_PRINCIPALS (their buckets would
have refilled anyway for all but an attacker rotating subjects, who is limited by the token issuer)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_PRINCIPALS = 100_000


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    limit: int


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until the next request would be allowed (0 when allowed)

    def headers(self) -> dict[str, str]:
        out = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
               "X-RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after_s)
        return out


class RateLimiter:
    def __init__(self, clock=time.monotonic) -> None:
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._clock = clock

    def hit(self, principal: str, limit: int) -> RateDecision:
        now = self._clock()
        rate = limit / 60.0
        bucket = self._buckets.pop(principal, None)
        if bucket is None or bucket.limit != limit:  # new principal, or its limit changed (policy reload)
            bucket = _Bucket(float(limit), now, limit)
        bucket.tokens = min(float(limit), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        self._buckets[principal] = bucket
        while len(self._buckets) > MAX_PRINCIPALS:
            self._buckets.popitem(last=False)
        retry = 0 if allowed else max(1, math.ceil((1.0 - bucket.tokens) / rate))
        return RateDecision(allowed, limit, int(bucket.tokens), math.ceil((limit - bucket.tokens) / rate), retry)
