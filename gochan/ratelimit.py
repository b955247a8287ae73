"""TokenBuckets: a rate limit per key (an identity's publishes per second)."""

from __future__ import annotations

import math
import time

__all__ = ["TokenBuckets"]

# Buckets kept before the full ones (keys idle long enough to have refilled,
# which a fresh bucket would equal) are dropped.
PRUNE_ABOVE = 10_000


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per
    second. A key's bucket exists while it is below full."""

    __slots__ = ("_buckets", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token of ``key``'s bucket: 0.0 if there was one, else the
        seconds until there will be (nothing is taken then)."""
        now = time.monotonic() if now is None else now
        buckets = self._buckets
        tokens, at = buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(buckets) >= PRUNE_ABOVE and key not in buckets:
            self._prune(now)
        buckets[key] = (tokens - 1.0, now)
        return 0.0

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))

    def _prune(self, now: float) -> None:
        burst, rate = self.burst, self.rate
        self._buckets = {
            key: (tokens, at)
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * rate < burst
        }

    def __len__(self) -> int:
        return len(self._buckets)
