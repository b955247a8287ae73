"""Server: listens, admits connections, sweeps HTTP timeouts on the
streamer's tick, reports metrics and shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING

from ..log import server_logger
from .http import NO_PEER, Peer, is_loopback_host, refresh_date
from .metrics import Metrics
from .protocol import ADMITTED, HttpProtocol
from .routes import Router

if TYPE_CHECKING:
    from ..config import Config
    from ..streamer import Streamer

__all__ = ["Server"]

LISTEN_BACKLOG = 4096
SHUTDOWN_POLL_S = 0.05


class Server:
    """The HTTP side of one :class:`gochan.Streamer`."""

    def __init__(
        self,
        streamer: Streamer,
        config: Config,
        *,
        sweep: bool = True,
        loopback_only: bool = False,
    ) -> None:
        """``sweep=False``: not hooked into the streamer's tick (a caller that
        drives ``_tick`` itself, with its own clock). ``loopback_only``: the caller
        promises it listens on loopback addresses only (``listen`` finds
        out for itself), which allows publishing without a key from
        loopback peers when no publish_key is set."""
        self.streamer = streamer
        self.config = config
        self.metrics = Metrics(streamer)
        self.router = Router(
            streamer,
            config,
            self.metrics.render,
            trust_loopback=loopback_only,
            authorize=streamer.authorize,
            refuse=self.metrics.refuse,
        )
        self.peers: dict[Peer, int] = {}  # open connections per peer address
        self.http: set[HttpProtocol] = set()  # connections not (yet) streaming
        self._listener: asyncio.Server | None = None
        self._closing = False
        if sweep:
            streamer.add_tick_hook(self._tick)

    # -- connections -------------------------------------------------------

    def protocol_factory(self) -> HttpProtocol:
        return HttpProtocol(self)

    def admit(self, proto: HttpProtocol, peername: object) -> str | None:
        """Count a new connection in, or say why it is refused."""
        self.metrics.connections_total += 1
        if self._closing:
            self.metrics.connections_refused += 1
            return "shutting down"
        if self.metrics.connections >= self.config.max_connections:
            self.metrics.connections_refused += 1
            return "too many connections"
        address = NO_PEER
        if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
            # One shared instance per address, for the connection and its clients.
            address = sys.intern(peername[0])
            count = self.peers.get(address, 0)
            if count >= self.config.peer_connection_limit:
                self.metrics.connections_refused += 1
                self.metrics.peer_refusals += 1
                return "too many connections from your address"
            self.peers[address] = count + 1
        proto.peer = address
        self.metrics.connections += 1
        proto.state |= ADMITTED
        self.http.add(proto)
        return None

    def streaming(self, proto: HttpProtocol) -> None:
        self.http.discard(proto)

    def forget(self, proto: HttpProtocol) -> None:
        # From connection_lost, for admitted and refused connections alike.
        if proto.state & ADMITTED:
            proto.state &= ~ADMITTED
            self.metrics.connections -= 1
            peer = proto.peer
            if peer:
                count = self.peers.get(peer, 0) - 1
                if count > 0:
                    self.peers[peer] = count
                else:
                    self.peers.pop(peer, None)
        self.http.discard(proto)

    def _tick(self, now: float) -> None:
        refresh_date()
        for proto in [p for p in self.http if p.deadline <= now]:
            proto.expire(now)

    # -- listening ---------------------------------------------------------

    async def listen(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self.protocol_factory, host, port, backlog=LISTEN_BACKLOG, reuse_address=True
        )
        # Decided by the addresses really bound, not by a configured name.
        self.router.trust_loopback = all(is_loopback_host(h) for h, _port in self.sockets)

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._listener is None:
            return []
        return [s.getsockname()[:2] for s in self._listener.sockets]

    @property
    def port(self) -> int:
        return int(self.sockets[0][1])

    async def shutdown(self) -> None:
        """Stop accepting, end every stream with ``Client closed`` after what
        it has queued, let in-flight requests finish, and wait up to the
        grace period for every connection to close; abort what is left."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        streams = self.streamer.end_streams(self)  # its own, not every stream of the hub
        deadline = time.monotonic() + self.config.shutdown_grace
        while any(p.busy for p in self.http) and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        for proto in list(self.http):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.close_soon()
                if proto.busy:
                    proto.transport.abort()
                else:
                    proto.transport.close()
        # Streams and answers drain to peers that read them, until the grace ends.
        while self.metrics.connections > 0 and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        if self.metrics.connections > 0:
            server_logger.warning(
                "%d connections still open after the %.1f s grace period: aborted",
                self.metrics.connections,
                self.config.shutdown_grace,
            )
            for transport in streams + [p.transport for p in self.http if p.transport]:
                with contextlib.suppress(Exception):
                    transport.abort()
        self.streamer.remove_tick_hook(self._tick)
        self.streamer._forget_server(self)
        if self._listener is not None:
            try:
                await asyncio.wait_for(self._listener.wait_closed(), self.config.shutdown_grace)
            except asyncio.TimeoutError:
                server_logger.warning("connections still open after the grace period")

    # -- metrics -----------------------------------------------------------

    @property
    def connections(self) -> int:
        """Open TCP connections, streams included."""
        return self.metrics.connections

    @property
    def bad_requests(self) -> int:
        return self.metrics.bad_requests

    def metrics_text(self) -> str:
        return self.metrics.render()
