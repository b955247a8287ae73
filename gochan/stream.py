"""Stream: one SSE stream, and the only writer to its transport.

Everything a stream sends (its HTTP head and first frames, a replay, live
frames, heartbeats, ``Client closed``) goes through the fan-out core's
:class:`~gochan._fast.Subscriber` it is, in order: the head first
(``send_first``: straight to the socket when nothing is ahead of it, and the
stream waits while the transport holds a tail the kernel did not take), then
one queue. A head the kernel takes only in part is never overtaken.
While it replays, its replay state lives here too (see :mod:`gochan.replay`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._fast import Hub, Subscriber

if TYPE_CHECKING:
    from .client import Client
    from .replay import ReplayState

__all__ = ["Stream"]


class Stream(Subscriber):
    """An SSE stream of one client: its place in the fan-out, its queue, and
    its replay cursor or held frames while it replays."""

    __slots__ = ("front_end", "replay")

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
