"""Test doubles for driving an asyncio Protocol by hand: a transport that
records what is written and whose write buffer the test controls, and a
clock the test moves."""

from __future__ import annotations

import asyncio
import re
from typing import Any

DEFAULT_HIGH_WATER = 64 * 1024


class FakeTransport:
    """What uvloop's TCPTransport offers a protocol, with no socket.

    Writes are recorded one by one in ``writes``. While ``peer_reads`` is
    False nothing written leaves: it stays in the buffer
    (``get_write_buffer_size``), and once the buffer passes the high-water
    mark the protocol's ``pause_writing`` is called, as uvloop does.
    :meth:`drain` is the peer reading everything: the buffer empties and
    ``resume_writing`` is called if writing was paused."""

    def __init__(self, peername: object = ("10.0.0.1", 40000)) -> None:
        self.protocol: asyncio.Protocol | None = None
        self.peername = peername
        self.writes: list[bytes] = []
        self.buffered = 0
        self.peer_reads = True
        self.high_water = DEFAULT_HIGH_WATER
        self.writing_paused = False  # pause_writing called, resume_writing not yet
        self.reading = True
        self.pause_reading_calls = 0
        self.resume_reading_calls = 0
        self.closed = False
        self.aborted = False

    def connect(self, protocol: asyncio.Protocol) -> FakeTransport:
        self.protocol = protocol
        protocol.connection_made(self)  # type: ignore[arg-type]
        return self

    @property
    def wire(self) -> bytes:
        """Everything written, in order."""
        return b"".join(self.writes)

    # -- asyncio.Transport -------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        # No "socket": the hub writes through write(), not writev() on a fd.
        return self.peername if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = DEFAULT_HIGH_WATER if high is None else high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.aborted, "write after close"
        assert isinstance(data, bytes)
        self.writes.append(data)
        if self.peer_reads:
            return
        self.buffered += len(data)
        if self.buffered > self.high_water and not self.writing_paused:
            self.writing_paused = True
            assert self.protocol is not None
            self.protocol.pause_writing()

    def writelines(self, parts: list[bytes]) -> None:
        self.write(b"".join(parts))

    def drain(self) -> None:
        """The peer reads everything buffered, and from now on keeps reading."""
        self.peer_reads = True
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            assert self.protocol is not None
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        assert self.reading, "pause_reading while paused"
        self.reading = False
        self.pause_reading_calls += 1

    def resume_reading(self) -> None:
        self.reading = True
        self.resume_reading_calls += 1

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def lose(self) -> None:
        """The connection is gone: its protocol (now) hears it."""
        assert self.protocol is not None
        self.protocol.connection_lost(None)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


_DATE = re.compile(rb"\r\nDate: [^\r\n]*\r\n")


def undated(data: bytes) -> bytes:
    """``data`` with every Date header's value replaced by ``*``."""
    return _DATE.sub(b"\r\nDate: *\r\n", data)
