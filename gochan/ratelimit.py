"""Rate limits per key: new connections per second per peer address, and
publishes per second per token identity, each a token bucket per key.

Each bucket is kept as one number, its theoretical arrival time (GCRA, the
form of a token bucket ATM switches and Redis cells use): the time at which
the bucket would be full again. A key whose bucket is full is the same as a
key never seen, so it is forgotten (``forget_idle``, on the tick): the table
holds only the keys that took tokens in the last burst / rate seconds, and
never more than MAX_KEYS of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

__all__ = ["MAX_KEYS", "RateLimit"]

# Keys tracked at most. Past it, the idle ones are forgotten at once, and if
# every one is busy the table starts over: many addresses (or identities)
# each going fast is a flood the global limits bound.
MAX_KEYS = 65_536
_ROUNDING_S = 1e-9


class RateLimit:
    """``rate`` tokens per second per key, ``burst`` at once."""

    __slots__ = ("_burst", "_clock", "_due", "_interval", "_tolerance")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be above 0 and burst at least 1")
        self._burst = burst
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._due: dict[str, float] = {}  # key -> when its bucket is full again

    def take(self, key: str, n: int = 1) -> float:
        """Take ``n`` tokens of ``key`` (all or none): 0.0 when there were
        that many, else the seconds until there will be (and nothing is
        taken); ``math.inf`` when ``n`` is more than the burst, which no
        wait gives."""
        if n > self._burst:
            return math.inf
        now = self._clock()
        due = self._due.get(key, now)
        if due < now:
            due = now
        # The last of the n tokens is the one that must fit in the bucket.
        wait = due + (n - 1) * self._interval - self._tolerance - now
        if wait > _ROUNDING_S:  # sums of 1/rate are not exact
            return wait
        due += n * self._interval
        if len(self._due) >= MAX_KEYS and key not in self._due:
            self.forget_idle(now)
            if len(self._due) >= MAX_KEYS:
                self._due.clear()
        self._due[key] = due
        return 0.0

    @property
    def burst(self) -> int:
        """The most tokens one key may take at once."""
        return self._burst

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))

    def forget_idle(self, now: float | None = None) -> int:
        """Forget the keys whose bucket is full again; returns how many."""
        if now is None:
            now = self._clock()
        idle = [key for key, due in self._due.items() if due <= now]
        for key in idle:
            del self._due[key]
        return len(idle)

    def __len__(self) -> int:
        return len(self._due)
