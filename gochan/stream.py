"""Stream: one SSE stream, and the only writer to its transport.

Everything a stream sends (its HTTP head and first frames, a replay, live
frames, heartbeats, ``Client closed``) goes through the fan-out core's
:class:`~gochan._fast.Subscriber` it is, in order: the head first
(``send_first``: straight to the socket when nothing is ahead of it, and the
stream waits while the transport holds a tail the kernel did not take), then
one queue. A head the kernel takes only in part is never overtaken.
While it replays, its replay state lives here too (see :mod:`gochan.replay`).

On the HTTP server a stream is also its connection's protocol: once the head
is written nothing more is parsed there, so the server hands the transport
to the stream (``transport.set_protocol``) and drops the HTTP protocol
object, one object fewer for every idle connection. It then tells its front
end, through ``stream_lost``, when the connection is gone.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol, cast

from ._fast import Hub, Subscriber

if TYPE_CHECKING:
    from .client import Client
    from .replay import ReplayState

__all__ = ["Stream", "StreamHost"]


class StreamHost(Protocol):
    """A front end that hands a stream its connection (the HTTP server)."""

    def stream_lost(self, stream: Stream) -> None: ...


class Stream(Subscriber, asyncio.Protocol):
    """An SSE stream of one client: its place in the fan-out, its queue, and
    its replay cursor or held frames while it replays."""

    __slots__ = ("front_end", "peer", "replay")

    def __init__(
        self,
        hub: Hub,
        transport: asyncio.WriteTransport,
        client: Client,
        front_end: object = None,
    ) -> None:
        # Subscriber.__cinit__ has taken (hub, transport, client).
        self.replay: ReplayState | None = None
        # The server (or adapter) that opened it, which ends it at shutdown.
        self.front_end = front_end
        # The address it is read from ("": not known), while it is its
        # connection's protocol.
        self.peer = ""

    @property
    def client(self) -> Client:
        client: Client = self.owner
        return client

    def writable(self) -> None:
        """The transport drained (its ``resume_writing``): write what waited,
        and go on replaying if it was."""
        self.resume()
        replay = self.replay
        if replay is not None:
            replay.drained(self)

    # -- as the connection's protocol (see the module's docstring) ---------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # handed over on a live connection: never called

    # Nothing is read from an event stream. Static, so that uvloop's
    # set_protocol, which keeps ``protocol.data_received``, keeps one shared
    # function instead of a bound method (64 B) per stream.
    @staticmethod
    def data_received(data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the peer is done: close

    def pause_writing(self) -> None:
        self.pause()

    def resume_writing(self) -> None:
        self.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        cast("StreamHost", self.front_end).stream_lost(self)
