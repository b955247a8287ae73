"""New connections per second per peer address: a token bucket per address.

Each bucket is kept as one number, its theoretical arrival time (GCRA, the
form of a token bucket ATM switches and Redis cells use): the time at which
the bucket would be full again. A peer whose bucket is full is the same as a
peer never seen, so it is forgotten (``forget_idle``, on the server's tick):
the table holds only the peers that opened connections in the last
burst / rate seconds, and never more than MAX_PEERS of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MAX_PEERS", "PeerRate"]

# Addresses tracked at most. Past it, the idle ones are forgotten at once,
# and if every one is busy the table starts over: many addresses each
# opening connections fast is a flood the global max_connections bounds.
MAX_PEERS = 65_536
_ROUNDING_S = 1e-9


class PeerRate:
    """``rate`` new connections per second per peer, ``burst`` at once."""

    __slots__ = ("_clock", "_due", "_interval", "_tolerance")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be above 0 and burst at least 1")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._due: dict[str, float] = {}  # peer -> when its bucket is full again

    def take(self, peer: str) -> float:
        """Count one new connection of ``peer``: 0.0 when it may open it, else
        the seconds until it may (and nothing is counted)."""
        now = self._clock()
        due = self._due.get(peer, now)
        if due < now:
            due = now
        wait = due - self._tolerance - now
        if wait > _ROUNDING_S:  # sums of 1/rate are not exact
            return wait
        due += self._interval
        if len(self._due) >= MAX_PEERS and peer not in self._due:
            self.forget_idle(now)
            if len(self._due) >= MAX_PEERS:
                self._due.clear()
        self._due[peer] = due
        return 0.0

    def forget_idle(self, now: float | None = None) -> int:
        """Forget the peers whose bucket is full again; returns how many."""
        if now is None:
            now = self._clock()
        idle = [peer for peer, due in self._due.items() if due <= now]
        for peer in idle:
            del self._due[peer]
        return len(idle)

    def __len__(self) -> int:
        return len(self._due)
