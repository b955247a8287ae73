"""Server: listens, admits connections, sweeps HTTP timeouts on the
streamer's tick, reports metrics and shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import socket
import sys
import time
from typing import TYPE_CHECKING

from .._fast import ConnectParser, PublishParser
from ..log import server_logger
from ..ratelimit import RateLimit
from ..waiting import within
from .access import AccessLog
from .http import MAX_QUERY_FIELDS, NO_PEER, Peer, is_loopback_host, refresh_date
from .metrics import Metrics
from .protocol import ADMITTED, HttpProtocol, Refusal
from .routes import Headers, Router

if TYPE_CHECKING:
    from ..config import Config
    from ..stream import Stream
    from ..streamer import Streamer
    from .handoff import Handoff
    from .routes import Headers

__all__ = ["Server"]

NO_HEADERS: Headers = []

LISTEN_BACKLOG = 4096
SHUTDOWN_POLL_S = 0.05
# Streams are ended over this first part of shutdown_grace; the rest is left
# for their last frames to flush.
SHUTDOWN_SPREAD_FRACTION = 0.5
SHUTDOWN_EXIT_RESERVE_S = 0.5  # at most, and at most a tenth of the grace


def _plain_path(path: str) -> bool:
    """Whether ``path`` reaches the router as these very bytes: printable
    ASCII with no "?" or "#" (which httptools would read as the query or a
    fragment), so the fast path's byte match means the route's match."""
    return path.isascii() and path.isprintable() and " " not in path and not set(path) & set("?#")


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
        self._peer_connection_limit = config.peer_connection_limit  # per connect: kept
        self.metrics = Metrics(streamer)
        self.router = Router(
            streamer,
            config,
            self.metrics.exposition,
            trust_loopback=loopback_only,
            authorize=streamer.authorize,
            refuse=self.metrics.refuse,
        )
        self.peers: dict[Peer, int] = {}  # open connections per peer address
        self.http: set[HttpProtocol] = set()  # connections not (yet) streaming
        self._listener: asyncio.Server | None = None
        self._closing = False
        # A worker of several (--workers): its hand-off channel, and the
        # header that names it on every answer. None in a single process.
        self.handoff: Handoff | None = None
        self.worker_headers: Headers = []
        self._adopting: set[asyncio.Task[None]] = set()
        # One JSON line per request (off: None, one attribute check per request).
        self.access_log = AccessLog() if config.access_log else None
        # The publish fast path (protocol.py): on unless the switch is off,
        # the access log is on (it logs each request), a hook authorizes
        # (its grant is the slow path's) or the driver must be awaited.
        router = self.router
        self.publish_parser: PublishParser | None = None
        if (
            config.fast_publish
            and self.access_log is None
            and router.publishes_fast
            and router.routes.get(config.publish_path, {}).get("POST") == router.publish
            and _plain_path(config.publish_path)
        ):
            self.publish_parser = PublishParser(
                config.publish_path,
                config.max_url_bytes,
                config.max_header_bytes,
                config.max_headers,
                config.max_body_bytes,
            )
        # The connect fast path: the same, for a connect the events route
        # takes without a request object (Router.connects_fast).
        self.connect_parser: ConnectParser | None = None
        if (
            config.fast_connect
            and self.access_log is None
            and router.connects_fast
            and _plain_path(config.events_path)
        ):
            self.connect_parser = ConnectParser(
                config.events_path,
                config.max_url_bytes,
                config.max_header_bytes,
                config.max_headers,
                min(config.max_topics_per_client, MAX_QUERY_FIELDS),
            )
        rate = config.connection_rate_per_peer
        self.connection_rate = RateLimit(rate, config.connection_burst_per_peer) if rate else None
        if sweep:
            streamer.add_tick_hook(self._tick)

    # -- connections -------------------------------------------------------

    def protocol_factory(self) -> HttpProtocol:
        if self.handoff is not None:
            from .handoff import HandoffProtocol

            return HandoffProtocol(self)
        return HttpProtocol(self)

    def adopt(self, sock: socket.socket, first_input: bytes) -> None:
        """Serve a connection another worker accepted (see handoff.py):
        ``first_input`` is what it read from it, parsed before anything else."""
        from .handoff import HandoffProtocol

        # While shutting down it is admitted only to be refused, as any
        # connection then is (503 "shutting down").
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        coro = loop.connect_accepted_socket(lambda: HandoffProtocol(self, first_input), sock)

        async def adopt() -> None:
            try:
                await coro
            except OSError as exc:
                server_logger.warning("a connection passed by another worker was lost: %s", exc)
                sock.close()

        task = loop.create_task(adopt())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def admit(self, proto: HttpProtocol, peername: object) -> Refusal | None:
        """Count a new connection in, or say why it is refused (the status,
        message and headers it is answered with before it is closed)."""
        metrics = self.metrics
        metrics.connections_total += 1
        if self._closing:
            metrics.connections_refused += 1
            metrics.refuse("shutting_down")
            return (503, "shutting down", NO_HEADERS)
        if metrics.connections >= self.config.max_connections:
            metrics.connections_refused += 1
            metrics.refuse("max_connections")
            return (503, "too many connections", NO_HEADERS)
        address = NO_PEER
        if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
            # One shared instance per address, for the connection and its clients.
            address = sys.intern(peername[0])
            if self.connection_rate is not None and proto.new_connection:
                wait = self.connection_rate.take(address)
                if wait:
                    metrics.connections_refused += 1
                    metrics.refuse("connection_rate")
                    retry = b"%d" % max(1, math.ceil(wait))
                    return (429, "too many new connections from your address", [
                        (b"Retry-After", retry)
                    ])  # fmt: skip
            count = self.peers.get(address, 0)
            if count >= self._peer_connection_limit:
                metrics.connections_refused += 1
                metrics.peer_refusals += 1
                metrics.refuse("max_connections_per_peer")
                return (503, "too many connections from your address", NO_HEADERS)
            self.peers[address] = count + 1
        proto.peer = address
        metrics.connections += 1
        proto.state |= ADMITTED
        self.http.add(proto)
        return None

    def streaming(self, proto: HttpProtocol) -> None:
        self.http.discard(proto)

    def forget(self, proto: HttpProtocol) -> None:
        # From connection_lost, for admitted and refused connections alike.
        if proto.state & ADMITTED:
            proto.state &= ~ADMITTED
            self._release(proto.peer)
        self.http.discard(proto)

    def stream_lost(self, stream: Stream) -> None:
        """A stream's connection is gone (the stream is its protocol: see
        HttpProtocol.start_stream; only admitted connections stream)."""
        log = self.access_log
        if log is not None:
            log.stream_ended(stream, stream.peer, stream.bytes_out)
        self.streamer.detach(stream)
        self._release(stream.peer)

    def _release(self, peer: Peer) -> None:
        self.metrics.connections -= 1
        if peer:
            count = self.peers.get(peer, 0) - 1
            if count > 0:
                self.peers[peer] = count
            else:
                self.peers.pop(peer, None)

    def _tick(self, now: float) -> None:
        refresh_date()
        if self.connection_rate is not None:
            self.connection_rate.forget_idle(now)
        for proto in [p for p in self.http if p.deadline <= now]:
            proto.expire(now)

    # -- listening ---------------------------------------------------------

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """``reuse_port``: share the port with other processes that set it
        too (SO_REUSEPORT: the workers of ``--workers``)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self.protocol_factory,
            host,
            port,
            backlog=LISTEN_BACKLOG,
            reuse_address=True,
            reuse_port=reuse_port or None,
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
        """Stop accepting, end every stream with ``Client closed`` (each with
        its own jittered delay, as a ``shutdown`` frame and as ``retry:``, see
        :meth:`Streamer.closing_frame`) after
        what it has queued, let in-flight requests finish, and wait up to the
        grace period for every connection to close; abort what is left.

        Streams are ended at an even pace over the first
        SHUTDOWN_SPREAD_FRACTION of ``shutdown_grace``, in random order,
        rather than in one burst: the flush of their last frames is spread
        out, and so are the reconnects of clients that ignore ``retry:``.
        The rest of the grace is left for the last ones to flush."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            self._listener.close()
        if self.handoff is not None:
            self.handoff.close()
        streamer = self.streamer
        grace = self.config.shutdown_grace
        start = time.monotonic()
        # What is left is aborted a little before the grace ends, so closing
        # the driver and exiting fit in it too.
        deadline = start + grace - min(SHUTDOWN_EXIT_RESERVE_S, grace * 0.1)
        spread = grace * SHUTDOWN_SPREAD_FRACTION
        streams = streamer.streams_of(self)  # its own, not every stream of the hub
        random.shuffle(streams)
        transports: list[asyncio.WriteTransport] = []
        ended = 0
        http_closed = False
        while True:
            now = time.monotonic()
            due = len(streams)
            if now < start + spread:  # an even pace: the share of the spread elapsed
                due = math.ceil(due * (now - start) / spread)
            for stream in streams[ended:due]:
                if not stream.closed:
                    transports.append(stream.transport)
                    streamer.end_stream(stream, streamer.closing_frame())
            ended = max(ended, due)
            if not http_closed and (now >= deadline or not any(p.busy for p in self.http)):
                self._close_http()
                http_closed = True
            if ended == len(streams) and http_closed:
                break
            await asyncio.sleep(SHUTDOWN_POLL_S)
        # A request that was waiting on the broker may have become a stream.
        for stream in streamer.streams_of(self):
            transports.append(stream.transport)
            streamer.end_stream(stream, streamer.closing_frame())
        # Streams and answers drain to peers that read them, until the grace ends.
        while self.metrics.connections > 0 and time.monotonic() < deadline:
            await asyncio.sleep(SHUTDOWN_POLL_S)
        if self.metrics.connections > 0:
            server_logger.warning(
                "%d connections still open after the %.1f s grace period: aborted",
                self.metrics.connections,
                self.config.shutdown_grace,
            )
            for transport in transports + [p.transport for p in self.http if p.transport]:
                with contextlib.suppress(Exception):
                    transport.abort()
            with contextlib.suppress(Exception):
                streamer.hub.sweep(math.inf)  # slow consumers still being cut
        streamer.remove_tick_hook(self._tick)
        streamer._forget_server(self)
        if self._listener is not None:
            try:
                remaining = max(SHUTDOWN_POLL_S, deadline - time.monotonic())
                await within(self._listener.wait_closed(), remaining)
            except asyncio.TimeoutError:
                server_logger.warning("connections still open after the grace period")

    def _close_http(self) -> None:
        """Close the connections that are not streams: in-flight answers go
        out first (an idle keep-alive connection just closes)."""
        for proto in list(self.http):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.close_soon()
                if proto.busy:
                    proto.transport.abort()
                else:
                    proto.transport.close()

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
