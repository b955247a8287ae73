"""A pure-Python twin of the compiled core, kept as a test oracle.

It is never used by the server. Tests feed the same operations to this and to
``gochan._fast.core`` and require the same bytes on every connection.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

HEARTBEAT = b":\n\n"
DEFAULT_MAX_PENDING = 1 << 20
_LINES = re.compile(rb"\r\n|\r|\n")


def encode_event(topic: str, event_id: str | None, data: bytes) -> bytes:
    head = b"event: " + topic.encode() + b"\n"
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    return head + b"".join(b"data: " + line + b"\n" for line in _LINES.split(data)) + b"\n"


def encode_system(payload: bytes) -> bytes:
    return encode_event("message", None, payload)


class Histogram:
    """Fixed buckets (``le`` bounds), +Inf last: a bisect on the bounds."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def record(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        cumulative, running = [], 0
        for n in self.counts:
            running += n
            cumulative.append(running)
        return self.bounds, cumulative, self.sum


class Subscriber:
    def __init__(self, hub: Hub, transport: Any, owner: Any = None) -> None:
        self.hub = hub
        self.transport = transport
        self.owner = owner
        self.queue: list[bytes] = []
        self.topic_set: dict[str, None] = {}
        self.paused = self.dirty = self.active = self.closed = False
        hub.subscribers[self] = None

    @property
    def topics(self) -> list[str]:
        return list(self.topic_set)

    @property
    def pending_bytes(self) -> int:
        return sum(map(len, self.queue))

    def send(self, frame: bytes, bounded: bool = True) -> bool:
        if self.closed:
            return False
        if bounded:
            self._enqueue(frame)
        else:
            self.queue.append(frame)
        self.active = True
        self.hub._mark_dirty(self)
        return True

    def send_first(self, head: bytes) -> bool:
        return self.send(head, False)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.queue and not self.closed:
            self._write_queue()

    def _enqueue(self, frame: bytes) -> None:
        if self.pending_bytes + len(frame) > self.hub.max_pending:
            self.closed = True
            self.queue.clear()
            self.hub.doomed.append(self)
            self.hub._mark_dirty(self)
            return
        self.queue.append(frame)

    def _write_queue(self) -> None:
        if self.queue:
            data = b"".join(self.queue)
            self.queue.clear()
            self.hub.writes += 1
            self.transport.write(data)


class Hub:
    def __init__(self, loop: Any, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.loop = loop
        self.max_pending = max_pending
        self.topics: dict[str, dict[Subscriber, None]] = {}
        self.subscribers: dict[Subscriber, None] = {}
        self.dirty: list[Subscriber] = []
        self.doomed: list[Subscriber] = []
        self.flush_scheduled = False
        self.writes = self.slow_disconnects = 0

    def _mark_dirty(self, sub: Subscriber) -> None:
        if not sub.dirty:
            sub.dirty = True
            self.dirty.append(sub)
            if not self.flush_scheduled:
                self.flush_scheduled = True
                self.loop.call_soon(self.flush)

    def publish(self, topic: str, frame: bytes) -> int:
        n = 0
        for sub in self.topics.get(topic, ()):
            if not sub.closed:
                sub._enqueue(frame)
                sub.active = True
                self._mark_dirty(sub)
                n += 1
        return n

    def subscribe(self, sub: Subscriber, topic: str) -> bool:
        if sub.closed or topic in sub.topic_set:
            return False
        self.topics.setdefault(topic, {})[sub] = None
        sub.topic_set[topic] = None
        return True

    def subscribe_all(self, sub: Subscriber, topics: Sequence[str]) -> int:
        if sub.closed:
            return 0
        return sum(self.subscribe(sub, topic) for topic in topics)

    def unsubscribe(self, sub: Subscriber, topic: str) -> bool:
        if topic not in sub.topic_set:
            return False
        del sub.topic_set[topic]
        del self.topics[topic][sub]
        if not self.topics[topic]:
            del self.topics[topic]
        return True

    def close(self, sub: Subscriber) -> None:
        sub.closed = True
        sub.queue.clear()
        for topic in list(sub.topic_set):
            self.unsubscribe(sub, topic)
        self.subscribers.pop(sub, None)

    def finish(self, sub: Subscriber, frame: bytes | None = None) -> None:
        if not sub.closed:
            if frame is not None:
                sub.queue.append(frame)  # the last frame goes even past the bound
            sub._write_queue()  # paused or not: the transport buffers it
        self.close(sub)
        sub.transport.close()

    def flush(self) -> None:
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for sub in dirty:
            sub.dirty = False
            if not (sub.closed or sub.paused):
                sub._write_queue()
        doomed, self.doomed = self.doomed, []
        for sub in doomed:
            self.slow_disconnects += 1
            self.close(sub)
            sub.transport.abort()

    def sweep(self, now: float) -> int:
        return 0  # slow consumers are aborted at once here (no socket to ask)

    def heartbeat(self, frame: bytes) -> int:
        sent = 0
        for sub in list(self.subscribers):
            if sub.closed:
                continue
            if sub.active:
                sub.active = False
                continue
            sub._enqueue(frame)
            self._mark_dirty(sub)
            sent += 1
        return sent

    def subscriber_count(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))
