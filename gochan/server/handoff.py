"""Passing a connection to the worker that holds its client (``--workers N``).

With SO_REUSEPORT the kernel picks a worker for each new connection, but a
client lives in the worker that created it. Generated client ids carry the
creator's tag (``w<index>.`` before the random part), so a worker that
parses a request naming another worker's client passes the connection on:
the socket's file descriptor goes over that worker's Unix socket
(``SCM_RIGHTS``) together with the bytes already read from it, and the
owner adopts the socket as if it had accepted it, feeding those bytes first.
The first worker then forgets the connection: nothing is relayed.

The channel is a ``SOCK_SEQPACKET`` socket per worker, in a directory only
the server's user can enter: each message is one descriptor and its bytes,
atomic, in order, and a connected pair is bounded by the socket buffer
rather than by the small datagram queue of ``SOCK_DGRAM``.

Only the worker path uses this module; a single process never imports it.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import orjson

from ..log import server_logger
from .http import Request, simple_response
from .protocol import BUSY, CLOSING, IN_REQUEST, HttpProtocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .app import Server
    from .routes import Reply

__all__ = ["Handoff", "HandoffProtocol", "owner_tag", "worker_of"]

# Bytes read past the request itself that may travel with it (what one read
# brought beyond it), on top of the request size limits.
HANDOFF_SLACK_BYTES = 256 * 1024
# The sending socket's buffer: a message must fit in it (the kernel caps it
# at net.core.wmem_max; a request too large for it is answered 503).
HANDOFF_SEND_BUFFER_BYTES = 4 * 1024 * 1024
HANDOFF_BACKLOG = 128
HANDOFF_CONNECT_TIMEOUT_S = 0.5
# Retry-After of a request that could not be passed to its worker.
HANDOFF_RETRY_AFTER_S = 1
_FD_BYTES = array.array("i").itemsize
_MISDIRECTED = b"this request names a client of another worker; send it alone on a new connection\n"
_UNREACHABLE = b"the worker holding this client is not reachable now; retry\n"


def owner_tag(index: int) -> str:
    """The prefix of the client ids worker ``index`` generates."""
    return f"w{index}."


def worker_of(client_id: str) -> int:
    """The worker index a client id's tag names, or -1 for an id without one."""
    tag, dot, _rest = client_id.partition(".")
    digits = tag[1:]
    if not dot or tag[:1] != "w" or not digits.isascii() or not digits.isdigit():
        return -1
    if len(digits) > 1 and digits[0] == "0":
        return -1  # one spelling per index
    return int(digits)


class Handoff:
    """This worker's end of the hand-off: a listening socket that adopts
    the connections other workers pass, and connections to theirs."""

    def __init__(
        self,
        directory: str,
        index: int,
        workers: int,
        max_bytes: int,
        adopt: Callable[[socket.socket, bytes], None],
    ) -> None:
        self.directory = directory
        self.index = index
        self.workers = workers
        self.max_bytes = max_bytes + HANDOFF_SLACK_BYTES
        self.adopt = adopt
        self.sent = 0
        self.adopted = 0
        self._listener: socket.socket | None = None
        self._incoming: set[socket.socket] = set()
        self._peers: dict[int, socket.socket] = {}
        self._buffer = bytearray(self.max_bytes)
        self._loop: asyncio.AbstractEventLoop | None = None

    def path(self, index: int) -> str:
        return os.path.join(self.directory, f"{index}.sock")

    # -- receiving ---------------------------------------------------------

    def listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        path = self.path(self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(path)
            sock.listen(HANDOFF_BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._listener = sock
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        while True:
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                server_logger.warning("hand-off accept failed: %s", exc)
                return
            conn.setblocking(False)
            self._incoming.add(conn)
            self._loop.add_reader(conn.fileno(), self._receive, conn)

    def _receive(self, conn: socket.socket) -> None:
        space = socket.CMSG_SPACE(_FD_BYTES)
        while True:
            try:
                size, ancdata, flags, _addr = conn.recvmsg_into([self._buffer], space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            fds = array.array("i")
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % _FD_BYTES])
            if not size and not fds:
                self._drop(conn)  # the other worker closed its end
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1:
                server_logger.warning("hand-off message refused (truncated or not one socket)")
                for fd in fds:
                    os.close(fd)
                continue
            sock = socket.socket(fileno=fds[0])
            if sock.family not in (socket.AF_INET, socket.AF_INET6) or (
                sock.type != socket.SOCK_STREAM
            ):
                sock.close()
                continue
            self.adopted += 1
            self.adopt(sock, bytes(memoryview(self._buffer)[:size]))

    def _drop(self, conn: socket.socket) -> None:
        if self._loop is not None:
            self._loop.remove_reader(conn.fileno())
        self._incoming.discard(conn)
        conn.close()

    # -- sending -----------------------------------------------------------

    def _connect(self, owner: int) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HANDOFF_SEND_BUFFER_BYTES)
            # Connecting to a listening Unix socket does not wait on a peer:
            # the timeout only bounds a full backlog.
            conn.settimeout(HANDOFF_CONNECT_TIMEOUT_S)
            conn.connect(self.path(owner))
            conn.setblocking(False)
        except OSError:
            conn.close()
            raise
        self._peers[owner] = conn
        return conn

    def send(self, owner: int, fd: int, data: bytes) -> str | None:
        """Pass socket ``fd`` and the bytes read from it to worker ``owner``;
        None once it is on its way (the caller then drops its own end), else
        why not."""
        if len(data) > self.max_bytes:
            return "too large"
        for attempt in (1, 2):
            conn = self._peers.get(owner)
            try:
                if conn is None:
                    conn = self._connect(owner)
                socket.send_fds(conn, [data], [fd])
            except (BlockingIOError, InterruptedError):
                return "busy"  # its buffer is full: the owner is not keeping up
            except OSError as exc:
                if conn is not None:
                    self._peers.pop(owner, None)
                    conn.close()
                if attempt == 2 or conn is None:
                    # Not listening (restarting), or a message it cannot take.
                    return exc.strerror or type(exc).__name__
                continue  # a connection to an earlier life of the worker: once more
            self.sent += 1
            return None
        return "unreachable"

    def collect(self) -> Iterator[Metric]:
        """This worker's families of ``GET /metrics`` (each worker has its own
        page): registered in its front end's registry, read at scrape time."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        worker = GaugeMetricFamily(
            "gochan_worker", "This process's worker index under --workers", labels=["index"]
        )
        worker.add_metric([str(self.index)], 1)
        yield worker
        yield CounterMetricFamily(
            "gochan_handoffs_sent",
            "Connections passed to the worker holding their client",
            self.sent,
        )
        yield CounterMetricFamily(
            "gochan_handoffs_adopted", "Connections taken from other workers", self.adopted
        )

    def close(self) -> None:
        if self._listener is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self.path(self.index))
        for conn in list(self._incoming):
            self._drop(conn)
        for conn in self._peers.values():
            conn.close()
        self._peers.clear()


class HandoffProtocol(HttpProtocol):
    """The connection of a worker: an :class:`HttpProtocol` that keeps the
    bytes read since it was last idle, and passes the connection on when a
    request names a client another worker holds."""

    __slots__ = ("_drop_rest", "_first_input", "_fresh", "_owner", "_raw", "new_connection")
    # A worker's answers carry its header, and a request read on a fast
    # path would not go through on_message_complete: the fast paths are off.
    fast_publish = False
    fast_connect = False

    def __init__(self, server: Server, first_input: bytes = b"") -> None:
        super().__init__(server)
        self._first_input = first_input  # read by the worker that passed it here
        self.new_connection = not first_input  # passed on: counted where it was accepted
        self._raw: bytes | None = b""  # since idle; None: past the bound, not passable
        self._fresh = False  # the next complete request starts at _raw[0]
        self._owner = -1  # the worker it is being passed to
        self._drop_rest = False  # a request was refused: nothing after it runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        first, self._first_input = self._first_input, b""
        if first and not (self.state & CLOSING):
            self.data_received(first)

    def data_received(self, data: bytes) -> None:
        if self.stream is not None or (self.state & CLOSING):
            return
        if not (self.state & (IN_REQUEST | BUSY)) and not self.pipeline and not self._unparsed:
            self._raw = data  # idle: every byte before this was answered
            self._fresh = True
        elif self._raw is not None:
            self._raw += data
            if len(self._raw) > self.server.handoff.max_bytes:  # type: ignore[union-attr]
                self._raw = None
        super().data_received(data)

    def eof_received(self) -> bool:
        if self._owner >= 0:
            return True  # the owner reads the end too: it stays with the socket
        return super().eof_received()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._drop_rest or self._owner >= 0:
            self.pipeline.pop()  # behind a request passed on or refused
            return
        fresh, self._fresh = self._fresh, False
        owner = self._owner_of(self.pipeline[-1])
        if owner < 0:
            # Only the first request since idle can be passed: until the
            # connection is idle again, nothing read needs keeping.
            self._raw = None
            return
        self.pipeline.pop()
        transport = self.transport
        assert transport is not None
        if (
            fresh
            and self._raw is not None
            and not self.pipeline
            and not (self.state & BUSY)
            and not self._out
            and not transport.get_write_buffer_size()
        ):
            # Nothing more is read here: what the owner does not get in
            # _raw stays in the socket for it.
            self._owner = owner
            self.state |= CLOSING
            transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._hand_off)
            return
        # Pipelined behind other requests: its own bytes cannot be told
        # apart from theirs, so it cannot be passed. Answered after them.
        self.server.metrics.refuse("handoff")
        self._drop_rest = True
        self._failure = (503, _MISDIRECTED.decode().strip(), [])
        self.state &= ~IN_REQUEST

    def _owner_of(self, request: Request) -> int:
        handoff = self.server.handoff
        assert handoff is not None
        config = self.config
        owner, client_id = tagged_owner(
            request, config.events_path, config.update_path, handoff.index, handoff.workers
        )
        if owner >= 0 and self.server.streamer.get_client(client_id) is not None:
            return -1  # a custom id that happens to look tagged: it is ours
        return owner

    def _hand_off(self) -> None:
        transport = self.transport
        handoff = self.server.handoff
        if transport is None or transport.is_closing() or handoff is None:
            return
        sock = transport.get_extra_info("socket")
        why = handoff.send(self._owner, sock.fileno(), self._raw or b"")
        self._raw = None
        if why is None:
            # Our descriptor only: the socket lives on in the owner's, and
            # closing ours sends nothing to the peer.
            transport.abort()
            return
        server_logger.warning("connection not passed to worker %d: %s", self._owner, why)
        self.server.metrics.refuse("handoff")
        retry = [(b"Retry-After", b"%d" % HANDOFF_RETRY_AFTER_S)]
        transport.write(simple_response(503, _UNREACHABLE, headers=retry, keep_alive=False))
        transport.close()

    def deliver(self, reply: Reply, request: Request) -> None:
        super().deliver(reply._replace(headers=reply.headers + self.server.worker_headers), request)


def tagged_owner(
    request: Request, events_path: str, update_path: str, index: int, workers: int
) -> tuple[int, str]:
    """The other worker whose client ``request`` names, and the id; (-1, "")
    when it names none (no id, an untagged or own id, a body that does not
    parse: the handlers answer those)."""
    client_id: object = None
    if request.path == events_path and request.method in ("GET", "HEAD"):
        try:
            ids = request.query().get("id")
        except ValueError:
            return -1, ""
        client_id = ids[0] if ids else None
    elif request.path == update_path and request.method == "POST":
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return -1, ""
        if isinstance(body, dict):
            client_id = body.get("client_id")
    if not isinstance(client_id, str):
        return -1, ""
    owner = worker_of(client_id)
    if owner < 0 or owner == index or owner >= workers:
        return -1, ""
    return owner, client_id
