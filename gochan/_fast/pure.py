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


PUBLISH_INCOMPLETE = -1
PUBLISH_DECLINED = -2
_PUBLISH_NAMES = frozenset((
    "host", "content-length", "content-type", "authorization", "origin",
    "connection", "user-agent", "accept", "accept-encoding",
))  # fmt: skip
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")
_TOPIC_BYTES = frozenset(range(0x21, 0x7F)) - frozenset(b"&%+#")
_VALUE_BYTES = frozenset(range(0x20, 0x7F))


class PublishParser:
    """The fast path's parser, written out plainly (see publish.pyx for the
    subset it accepts)."""

    def __init__(
        self,
        publish_path: str,
        max_url_bytes: int,
        max_header_bytes: int,
        max_headers: int,
        max_body_bytes: int,
    ) -> None:
        self.path = publish_path.encode("latin-1")
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes

    def parse(self, data: bytes, pos: int = 0) -> tuple[Any, ...] | int:
        if not 0 <= pos < len(data):
            return PUBLISH_INCOMPLETE
        rest = data[pos:]
        prefix = b"POST " + self.path + b"?topic="
        if not rest.startswith(prefix):
            return PUBLISH_INCOMPLETE if prefix.startswith(rest) else PUBLISH_DECLINED
        i = len(prefix)
        while i < len(rest) and rest[i] in _TOPIC_BYTES:
            i += 1
        topic = rest[len(prefix) : i]
        if len(self.path) + 7 + len(topic) > self.max_url_bytes:
            return PUBLISH_DECLINED
        if i == len(rest):
            return PUBLISH_INCOMPLETE
        if not topic:
            return PUBLISH_DECLINED
        version = b" HTTP/1.1\r\n"
        if not rest[i:].startswith(version):
            return PUBLISH_INCOMPLETE if version.startswith(rest[i:]) else PUBLISH_DECLINED
        i += len(version)
        fields: dict[str, str] = {}
        header_bytes = 0
        while True:
            line_end = rest.find(b"\r\n", i)
            line = rest[i:] if line_end < 0 else rest[i:line_end]
            if line_end < 0:  # the last line is not all there: is it wrong yet?
                return self._partial_line(line, fields)
            i = line_end + 2
            if not line:
                break
            name_bytes, colon, raw = line.partition(b":")
            if not colon or not name_bytes or not all(c in _NAME_BYTES for c in name_bytes):
                return PUBLISH_DECLINED
            name = name_bytes.decode("ascii").lower()
            if name not in _PUBLISH_NAMES or name in fields:
                return PUBLISH_DECLINED
            value = raw.lstrip(b" \t")
            if not value or value.endswith(b" ") or not all(c in _VALUE_BYTES for c in value):
                return PUBLISH_DECLINED
            header_bytes += len(name_bytes) + len(value) + 4
            if header_bytes > self.max_header_bytes or len(fields) + 1 > self.max_headers:
                return PUBLISH_DECLINED
            text = value.decode("latin-1")
            if name == "content-length":
                if not text.isdigit() or len(text) > 15 or int(text) > self.max_body_bytes:
                    return PUBLISH_DECLINED
            elif name == "connection" and text.lower() != "keep-alive":
                return PUBLISH_DECLINED
            fields[name] = text
        if "content-length" not in fields:
            return PUBLISH_DECLINED
        length = int(fields["content-length"])
        if len(rest) - i < length:
            return PUBLISH_INCOMPLETE
        return (
            pos + i + length,
            topic.decode("latin-1"),
            rest[i : i + length],
            fields.get("host", ""),
            fields.get("origin"),
            fields.get("authorization"),
        )

    @staticmethod
    def _partial_line(line: bytes, fields: dict[str, str]) -> int:
        if not line:
            return PUBLISH_INCOMPLETE
        if line[0] == 13:  # CR: the end of the head, unless a byte but LF follows
            return PUBLISH_INCOMPLETE if len(line) == 1 else PUBLISH_DECLINED
        j = 0
        while j < len(line) and line[j] in _NAME_BYTES:
            j += 1
        if j == len(line):
            return PUBLISH_INCOMPLETE
        name = line[:j].decode("ascii").lower()
        if line[j] != 58 or name not in _PUBLISH_NAMES or name in fields:  # ":"
            return PUBLISH_DECLINED
        k = j + 1
        while k < len(line) and line[k] in b" \t":
            k += 1
        while k < len(line) and line[k] in _VALUE_BYTES:
            k += 1
        if k == len(line) or (line[k] == 13 and k + 1 == len(line)):
            return PUBLISH_INCOMPLETE
        return PUBLISH_DECLINED
