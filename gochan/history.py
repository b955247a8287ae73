"""History: the bounded in-memory record that Last-Event-ID replay reads.

Every message the streamer numbers itself (``<epoch>-<seq>``) is kept here as
the very frame that was sent, in one ring in publish order, so a reconnecting
stream gets the same bytes again. The ring is bounded by count, bytes and age,
always evicting the oldest; for each topic it remembers the newest sequence
number it has evicted (its floor), which is what tells a complete replay
from one with a hole in it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator
from itertools import islice
from typing import NamedTuple

__all__ = ["History", "Retained"]

MAX_FLOORS = 4096  # per-topic floors kept before old ones are folded together
# What a kept message costs beside its frame (the entry tuple, its number and
# timestamp objects, the ring's slot), counted against max_bytes so the bound
# is on memory, not only on frames.
ENTRY_BYTES = 128


class Retained(NamedTuple):
    seq: int
    topic: str
    frame: bytes
    at: float  # monotonic time it was added


class History:
    def __init__(self, max_messages: int, max_bytes: int, max_age_s: float) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        # (seq, topic, frame, at) tuples: a Retained is made only when read
        # (a replay), not for each of the messages kept.
        self._ring: deque[tuple[int, str, bytes, float]] = deque()
        self._floors: dict[str, int] = {}  # topic -> oldest id replayable in full
        self._shared_floor = 0  # the floor of every topic not in _floors
        self.bytes = 0
        self.last_seq = 0  # the newest seq added (0: none yet)

    @property
    def enabled(self) -> bool:
        return self.max_messages > 0 and self.max_bytes > 0 and self.max_age_s > 0

    def __len__(self) -> int:
        return len(self._ring)

    @property
    def first_seq(self) -> int:
        """The oldest retained seq (last_seq + 1 when empty)."""
        return self._ring[0][0] if self._ring else self.last_seq + 1

    def add(self, seq: int, topic: str, frame: bytes, now: float) -> None:
        # Once the ring is full (the steady state), every message evicts the
        # oldest: this runs once per message published, so it is inlined.
        ring = self._ring
        if seq != self.last_seq + 1 and ring:
            # Numbering restarted or skipped: what is kept can no longer be
            # located by seq, so start over.
            self.clear()
        self.last_seq = seq
        ring.append((seq, topic, frame, now))
        self.bytes += len(frame) + ENTRY_BYTES
        while len(ring) > self.max_messages or self.bytes > self.max_bytes:
            old_seq, old_topic, old_frame, _ = ring.popleft()
            self.bytes -= len(old_frame) + ENTRY_BYTES
            self._set_floor(old_topic, old_seq)
        # Age is enforced by expire(), which the streamer's tick calls.

    def expire(self, now: float) -> None:
        deadline = now - self.max_age_s
        ring = self._ring
        while ring and ring[0][3] < deadline:
            old_seq, old_topic, old_frame, _ = ring.popleft()
            self.bytes -= len(old_frame) + ENTRY_BYTES
            self._set_floor(old_topic, old_seq)

    def mark_gap(self, topic: str) -> None:
        """Something on ``topic`` was (or may have been) lost now: a replay
        from before this point would have a hole."""
        self._set_floor(topic, self.last_seq + 1)

    def _set_floor(self, topic: str, seq: int) -> None:
        if self._floors.get(topic, self._shared_floor) >= seq:
            return
        self._floors[topic] = seq
        if len(self._floors) > MAX_FLOORS:
            # Fold floors older than the ring into the shared one: a Last-Event-ID
            # that old is checked against the most cautious of them.
            first = self.first_seq
            old = [t for t, floor in self._floors.items() if floor < first]
            for t in old or list(self._floors)[: len(self._floors) // 2]:
                self._shared_floor = max(self._shared_floor, self._floors.pop(t))

    def clear(self) -> None:
        self._shared_floor = self.last_seq + 1
        self._floors.clear()
        self._ring.clear()
        self.bytes = 0

    def complete_after(self, seq: int, topics: Collection[str]) -> bool:
        """True when every message on ``topics`` after ``seq`` is retained."""
        if seq > self.last_seq:
            return False
        floors, shared = self._floors, self._shared_floor
        return all(seq >= floors.get(topic, shared) for topic in topics)

    def after(self, seq: int) -> Iterator[Retained]:
        """Retained messages with a seq greater than ``seq``, oldest first."""
        ring = self._ring
        if not ring:
            return iter(())
        return map(Retained._make, islice(ring, max(0, seq + 1 - ring[0][0]), None))
