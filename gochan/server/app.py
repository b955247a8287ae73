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
from .protocol import HttpProtocol
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
        """``sweep=False``: no sockets of its own to time out (an adapter that
        borrows its router and metrics). ``loopback_only``: the caller
        promises it listens on loopback addresses only (``listen`` finds
        out for itself), which allows publishing without a key from
        loopback peers when no publish_key is set."""
        self.streamer = streamer
        self.config = config
        self.router = Router(streamer, config, self.metrics_text, trust_loopback=loopback_only)
        self.connections = 0  # open TCP connections, streams included
        self.peers: dict[Peer, int] = {}  # open connections per peer address
        self.http: set[HttpProtocol] = set()  # connections not (yet) streaming
        self.connections_total = 0
        self.connections_refused = 0
        self.peer_refusals = 0
        self.bad_requests = 0
        self._listener: asyncio.Server | None = None
        self._closing = False
        if sweep:
            streamer.add_tick_hook(self._tick)

    # -- connections -------------------------------------------------------

    def protocol_factory(self) -> HttpProtocol:
        return HttpProtocol(self)

    def admit(self, proto: HttpProtocol, peername: object) -> str | None:
        """Count a new connection in, or say why it is refused."""
        self.connections_total += 1
        if self._closing:
            self.connections_refused += 1
            return "shutting down"
        if self.connections >= self.config.max_connections:
            self.connections_refused += 1
            return "too many connections"
        address = NO_PEER
        if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
            # One shared instance per address, for the connection and its clients.
            address = sys.intern(peername[0])
            count = self.peers.get(address, 0)
            if count >= self.config.peer_connection_limit:
                self.connections_refused += 1
                self.peer_refusals += 1
                return "too many connections from your address"
            self.peers[address] = count + 1
        proto.peer = address
        self.connections += 1
        proto.admitted = True
        self.http.add(proto)
        return None

    def streaming(self, proto: HttpProtocol) -> None:
        self.http.discard(proto)

    def forget(self, proto: HttpProtocol) -> None:
        # From connection_lost, for admitted and refused connections alike.
        if proto.admitted:
            proto.admitted = False
            self.connections -= 1
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
        streams = self.streamer.end_all_streams()
        deadline = time.monotonic() + self.config.shutdown_grace
        while any(p.busy for p in self.http) and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        for proto in list(self.http):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.closing = True
                if proto.busy:
                    proto.transport.abort()
                else:
                    proto.transport.close()
        # Streams and answers drain to peers that read them, until the grace ends.
        while self.connections > 0 and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        if self.connections > 0:
            server_logger.warning(
                "%d connections still open after the %.1f s grace period: aborted",
                self.connections,
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

    def metrics_text(self) -> str:
        stats = self.streamer.stats()
        driver = stats.pop("driver", {}) or {}
        rows = [
            ("gochan_connections", "gauge", "Open TCP connections", self.connections),
            ("gochan_streams", "gauge", "Open event streams", stats.get("connections", 0)),
            ("gochan_clients", "gauge", "Known clients", stats["clients"]),
            ("gochan_topics", "gauge", "Topics with a local stream", stats.get("topics", 0)),
            ("gochan_driver_subscriptions", "gauge", "Broker subscriptions held",
             stats["driver_subscriptions"]),
            ("gochan_connections_total", "counter", "Connections accepted or refused",
             self.connections_total),
            ("gochan_connections_refused_total", "counter", "Connections refused (limit)",
             self.connections_refused),
            ("gochan_peer_connections_refused_total", "counter",
             "Connections refused for one address's share (max_connections_per_peer)",
             self.peer_refusals),
            ("gochan_bad_requests_total", "counter", "Requests refused as malformed",
             self.bad_requests),
            ("gochan_messages_published_total", "counter", "Messages published via gochan",
             stats["published"]),
            ("gochan_messages_in_total", "counter", "Messages received from the driver",
             stats["messages_in"]),
            ("gochan_deliveries_total", "counter", "Frames queued to streams",
             stats.get("deliveries", 0)),
            ("gochan_writes_total", "counter", "Socket writes", stats.get("writes", 0)),
            ("gochan_bytes_out_total", "counter", "Bytes written to streams",
             stats.get("bytes_written", 0)),
            ("gochan_slow_consumer_disconnects_total", "counter",
             "Streams dropped for unsent output over the bound", stats.get("slow_disconnects", 0)),
            ("gochan_subscription_failures_total", "counter", "Broker subscription failures",
             stats["subscription_failures"]),
            ("gochan_clients_expired_total", "counter", "Clients removed by TTL",
             stats["clients_expired"]),
            ("gochan_replay_hits_total", "counter", "Reconnects fully replayed",
             stats["replay_hits"]),
            ("gochan_replay_misses_total", "counter", "Reconnects that could not be replayed",
             stats["replay_misses"]),
            ("gochan_broker_reconnects_total", "counter", "Broker reconnections",
             int(driver.get("reconnects", 0))),
            ("gochan_history_messages", "gauge", "Messages kept for replay",
             stats["history_messages"]),
            ("gochan_history_bytes", "gauge", "Bytes of frames kept for replay",
             stats["history_bytes"]),
        ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines.append("# TYPE gochan_driver_ready gauge")
        lines.append(f"gochan_driver_ready {int(self.streamer.ready)}")
        return "\n".join(lines) + "\n"
