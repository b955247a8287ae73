"""Type stubs for gochan._fast.core (the Cython fan-out core)."""

import asyncio
from collections.abc import Sequence
from typing import Any

HEARTBEAT: bytes
DEFAULT_MAX_PENDING: int
DEFAULT_MAX_FLUSH_DELAY: float
LATENCY_BUCKETS_S: tuple[float, ...]
STREAM_DURATION_BUCKETS_S: tuple[float, ...]

def encode_event(topic: str, event_id: str | None, data: bytes) -> bytes:
    """``event:``/``id:``/``data:`` frame; data split on CRLF, LF and CR."""

def encode_system(payload: bytes) -> bytes:
    """``event: message`` frame carrying ``payload``."""

class Histogram:
    """Counts of observations in fixed buckets (upper bounds, ``le``)."""

    sum: float
    count: int
    def __init__(self, bounds: Sequence[float]) -> None: ...
    def record(self, value: float) -> None:
        """Count one observation of ``value``."""
    @property
    def bounds(self) -> tuple[float, ...]: ...
    def snapshot(self) -> tuple[tuple[float, ...], list[int], float]:
        """``(bounds, cumulative counts, sum)``: a count per bound, then
        the +Inf bucket (every observation)."""

class Topic:
    name: str
    def __len__(self) -> int: ...

class Subscriber:
    """One SSE stream's queue and topic memberships."""

    owner: Any
    closed: bool
    paused: bool
    transport: asyncio.WriteTransport
    hub: Hub
    bytes_out: int
    def __init__(self, hub: Hub, transport: asyncio.WriteTransport, owner: Any = None) -> None: ...
    @property
    def topics(self) -> list[str]: ...
    @property
    def pending_bytes(self) -> int: ...
    def send(self, frame: bytes, bounded: bool = True) -> bool: ...
    def send_first(self, head: bytes) -> bool: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...

class Hub:
    """Topic table and fan-out; writes coalesced once per loop iteration."""

    max_pending: int
    deliveries: int
    messages: int
    writes: int
    bytes_written: int
    slow_disconnects: int
    direct_writes: int
    direct: bool
    send_buffer: int
    max_delay: float
    next_delay: float
    cut_linger: float
    streams_opened: int
    latency: Histogram
    """Per message: from its arrival at the streamer to the end of the
    flush that wrote it to its streams (seconds)."""
    durations: Histogram
    """Per stream: its lifetime, observed when it closes (seconds)."""
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_pending: int = ...,
        direct: bool = True,
        max_delay: float = ...,
        send_buffer: int = ...,
        cut_linger: float = ...,
        latency_buckets: Sequence[float] = ...,
        duration_buckets: Sequence[float] = ...,
    ) -> None: ...
    def publish(self, topic: str, frame: bytes, since: float = 0.0) -> int:
        """Queue ``frame`` on every stream of ``topic``; how many. ``since``:
        when the message reached the streamer (``time.monotonic()``; 0: now)."""
    def subscribe(self, sub: Subscriber, topic: str) -> bool: ...
    def subscribe_all(self, sub: Subscriber, topics: Sequence[str]) -> int: ...
    def unsubscribe(self, sub: Subscriber, topic: str) -> bool: ...
    def close(self, sub: Subscriber) -> None: ...
    def finish(self, sub: Subscriber, frame: bytes | None = None) -> None: ...
    def flush(self) -> None: ...
    def sweep(self, now: float) -> int:
        """Reset slow consumers being cut once drained or past their deadline."""
    @property
    def cutting_count(self) -> int: ...
    def heartbeat(self, frame: bytes) -> int: ...
    def subscriber_count(self, topic: str) -> int: ...
    @property
    def topic_count(self) -> int: ...
    @property
    def connection_count(self) -> int: ...
    def open_subscribers(self) -> list[Subscriber]: ...
    def stats(self) -> dict[str, int]: ...

PUBLISH_INCOMPLETE: int
PUBLISH_DECLINED: int

class PublishParser:
    """Reads a single publish, ``POST <publish_path>?topic=<T>`` with a raw
    body, from an input buffer, for the protocol's fast path. It accepts
    only a strict subset of HTTP/1.1 (see gochan/_fast/publish.pyx) whose
    meaning is certain, and declines the rest for httptools to read."""

    max_url_bytes: int
    max_header_bytes: int
    max_headers: int
    max_body_bytes: int
    def __init__(
        self,
        publish_path: str,
        max_url_bytes: int,
        max_header_bytes: int,
        max_headers: int,
        max_body_bytes: int,
    ) -> None: ...
    def parse(
        self, data: bytes, pos: int = 0
    ) -> tuple[int, str, bytes, str, str | None, str | None] | int:
        """The request starting at ``data[pos]``: ``(end, topic, body, host,
        origin, authorization)`` (``end``: the index just past its body;
        ``host`` is "" and the others None when absent), or
        ``PUBLISH_INCOMPLETE`` (the bytes so far may still become one: none
        is wrong yet, but it is not all there) or ``PUBLISH_DECLINED`` (not
        one the fast path takes: the general parser must read it)."""

class ConnectParser:
    """Reads a connect, ``GET <events_path>?topic=<T>&topic=<U>...`` that asks
    for a new client and nothing else, from a whole input buffer, for the
    protocol's fast path. It accepts only a strict subset of HTTP/1.1 (see
    gochan/_fast/connect.pyx) and declines the rest for httptools to read."""

    max_url_bytes: int
    max_header_bytes: int
    max_headers: int
    max_topics: int
    def __init__(
        self,
        events_path: str,
        max_url_bytes: int,
        max_header_bytes: int,
        max_headers: int,
        max_topics: int,
    ) -> None: ...
    def parse(self, data: bytes) -> list[str] | None:
        """The topics of the connect that is all of ``data``, in order (as
        the query names them, repeats too), or None: not one the fast path
        takes (the general parser must read it)."""
