"""ASGI adapter: serve gochan's endpoints from a Starlette or FastAPI app.

:class:`GochanASGI` is an ASGI 3 application that answers with the same
handlers as gochan's own server (:class:`gochan.server.routes.Router`), so the
wire protocol is the same: paths, status codes, headers, first frame and
data frames byte for byte. The host app brings its routing and middleware
(authentication, CORS, sessions)::

    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from gochan import Config, Streamer
    from gochan.asgi import GochanASGI

    realtime = GochanASGI(Streamer(Config(publish_key="s3cret")))
    app = FastAPI(lifespan=realtime.lifespan)  # starts and closes the Streamer
    app.mount("/realtime", realtime)  # /realtime/events, /realtime/publish, ...

Lifespan
    The Streamer must run: pass :meth:`GochanASGI.lifespan` as the host app's
    ``lifespan`` (or enter it from your own lifespan). When GochanASGI *is* the
    ASGI app, it answers the server's ``lifespan`` messages itself. While it
    runs, SIGINT/SIGTERM first end every stream with ``Client closed``, then
    reach the server's own handler: without that, servers such as uvicorn
    wait for streams that never end before they shut down.

Publishing
    With ``publish_key_required=True`` (the default) ``POST /publish`` needs
    ``Authorization: Bearer <publish_key>``, and, unlike gochan's server, no
    key at all refuses every publish (403): the adapter cannot tell how the
    host app is exposed, so there is no loopback exemption. When the host's
    own middleware decides who may publish, pass
    ``publish_key_required=False``.

Backpressure
    Each stream's bytes wait in a small buffer that one task hands to the ASGI
    ``send()``. Past ``write_buffer_high_bytes`` the stream is paused, as a
    socket whose buffer is full, so frames wait in gochan's bounded queue and
    a consumer more than ``max_pending_bytes`` behind is dropped, as with
    gochan's server (it ends without ``Client closed``; the client reconnects).

The ASGI server decides framing (uvicorn sends the stream chunked) and adds
its own headers: run uvicorn with ``server_header=False`` (``--no-server-header``)
so only ``Server: gochan`` is sent. CORS may come from gochan's
``cors_origins`` or from the host's middleware, not both.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from types import FrameType
from typing import Any

from .auth import Authorize
from .log import server_logger
from .server.http import Request
from .server.metrics import Metrics
from .server.routes import OpenStream, Response, Router
from .stream import Stream
from .streamer import Streamer
from .waiting import within

__all__ = ["GochanASGI", "Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# How long a stream dropped by gochan (slow consumer) may take to end its
# response cleanly before the connection is left to the ASGI server to close.
DEFAULT_END_TIMEOUT_S = 1.0

_SERVER_HEADER = (b"server", b"gochan")
_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_OPEN, _CLOSING, _ABORTED = 0, 1, 2


class _StreamTransport(asyncio.WriteTransport):
    """What the hub writes one event stream to: a buffer that :meth:`pump`
    hands to the ASGI ``send()``, with the pause/resume of a socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, high_water: int, grace: float) -> None:
        super().__init__()
        self.loop = loop
        self.high_water = high_water
        self.grace = grace
        self.chunks: list[bytes] = []
        self.size = 0
        self.state = _OPEN
        self.paused = False
        self.sub: Stream | None = None
        self.pump_task: asyncio.Task[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    # -- what the hub calls ------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.state != _OPEN:
            return
        if type(data) is not bytes:
            data = bytes(data)
        self.chunks.append(data)
        self.size += len(data)
        if self.size > self.high_water and not self.paused and self.sub is not None:
            self.paused = True
            self.sub.pause()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Graceful: what is buffered is sent, then the response ends (within
        ``grace`` seconds, or the stream is cut)."""
        if self.state == _OPEN:
            self.state = _CLOSING
            self._deadline = self.loop.call_later(self.grace, self._stop_pump)
            self._wake()

    def abort(self) -> None:
        """Drop what is buffered and stop sending now (slow consumer)."""
        if self.state != _ABORTED:
            self.state = _ABORTED
            self.chunks = []
            self.size = 0
            self._stop_pump()

    def is_closing(self) -> bool:
        return self.state != _OPEN

    def get_write_buffer_size(self) -> int:
        return self.size

    # -- what the adapter calls --------------------------------------------

    def attach(self, sub: Stream) -> None:
        self.sub = sub
        if self.size > self.high_water and not self.paused:
            self.paused = True
            sub.pause()

    def release(self) -> None:
        """The stream is over: ignore further writes, drop references."""
        self.state = _ABORTED
        self.chunks = []
        self.size = 0
        self.sub = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    async def pump(self, send: Send, start: Message) -> None:
        """Send the head, then everything written, until gochan ends the stream."""
        await send(start)
        while True:
            if not self.chunks:
                if self.state != _OPEN:
                    break
                self._waiter = self.loop.create_future()
                await self._waiter
                continue
            chunks = self.chunks
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.chunks = []
            self.size = 0
            await send({"type": "http.response.body", "body": data, "more_body": True})
            # send() returned: the server took the bytes, so we have drained.
            if self.paused and self.state == _OPEN and self.sub is not None:
                self.paused = False
                self.sub.writable()  # may write (and pause) again at once
        if self.state == _CLOSING:
            await send(_end())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _stop_pump(self) -> None:
        if self.pump_task is not None and not self.pump_task.done():
            self.pump_task.cancel()


def _end() -> Message:
    return {"type": "http.response.body", "body": b"", "more_body": False}


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _peer(scope: Scope) -> str:
    """The client's address as the ASGI server saw it ("" if unknown)."""
    client = scope.get("client")
    if client and isinstance(client[0], str):
        return str(client[0])
    return ""


def _route_path(scope: Scope) -> str:
    """The path below the mount point, as Starlette's Mount computes it:
    ``path`` holds the full path and ``root_path`` the mount prefix (older
    Starlette versions put only the remainder in ``path``)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        path = path[len(root) :]
    return path or "/"


class GochanASGI:
    """gochan's HTTP endpoints as an ASGI 3 application.

    ``streamer`` must be started before requests arrive: use :meth:`lifespan`.
    ``publish_key_required=False`` leaves the decision of who may publish to
    the host app's middleware. ``handle_signals=False`` leaves SIGINT and
    SIGTERM alone: then call :meth:`end_streams` when the server stops, or it
    waits for the streams. ``authorize``: the authorization hook (see
    :mod:`gochan.auth`), by default the streamer's. Limits
    (``max_body_bytes``, ``max_connections`` for requests in flight,
    ``write_buffer_high_bytes``, ``max_pending_bytes``, ``shutdown_grace`` to
    flush a closing stream) and paths come from the streamer's config.
    ``metrics`` holds the request counters /metrics reports.
    """

    def __init__(
        self,
        streamer: Streamer,
        *,
        publish_key_required: bool = True,
        handle_signals: bool = True,
        authorize: Authorize | None = None,
    ) -> None:
        self.streamer = streamer
        self.config = streamer.config
        # This front end's own counters, rendered as the raw server's are.
        self.metrics = Metrics(streamer)
        # Behind ASGI gochan cannot know how it is exposed: no loopback exemption.
        self.router = Router(
            streamer,
            self.config,
            self.metrics.exposition,
            trust_loopback=False,
            check_publishers=publish_key_required,
            no_key_hint=", or pass GochanASGI(publish_key_required=False) "
            "when the app authorizes publishers",
            authorize=authorize if authorize is not None else streamer.authorize,
            refuse=self.metrics.refuse,
        )
        self.handle_signals = handle_signals
        self._exiting = False

    # -- ASGI --------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1003})  # refused before accept

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async with contextlib.AsyncExitStack() as stack:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await stack.enter_async_context(self.lifespan())
                    except Exception as exc:
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await stack.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def lifespan(self, app: object = None) -> contextlib.AbstractAsyncContextManager[None]:
        """Start the streamer; on exit end every stream and close it. Pass it
        as ``FastAPI(lifespan=...)``/``Starlette(lifespan=...)``, or enter it
        in your own lifespan: ``async with realtime.lifespan(app): yield``."""
        return self._running()

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        await self.streamer.start()
        restore = _chain_exit_signals(self.end_streams) if self.handle_signals else None
        try:
            yield
        finally:
            if restore is not None:
                restore()
            self.end_streams()
            await self.streamer.close()

    def end_streams(self) -> None:
        """Refuse new streams and end every stream served here with
        ``Client closed`` (server shutdown). Other requests are still served."""
        self._exiting = True
        if not self.streamer.started:
            return
        self.streamer.end_streams(self)

    # -- requests ----------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.metrics
        metrics.connections_total += 1
        if metrics.connections >= self.config.max_connections:
            metrics.connections_refused += 1
            metrics.refuse("max_connections")
            await self._respond(scope, send, Response(503, b"too many connections\n"), [])
            return
        metrics.connections += 1
        try:
            await self._serve(scope, receive, send)
        finally:
            metrics.connections -= 1

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.streamer.started:
            message = b"gochan is not running (start it in the app's lifespan)\n"
            await self._respond(scope, send, Response(503, message), [])
            return
        request = await self._request(scope, receive)
        if request is None:
            return
        if isinstance(request, Response):
            self.metrics.malformed(request.status)
            await self._respond(scope, send, request, [(b"connection", b"close")])
            return
        try:
            reply = self.router.dispatch(request)
            if not isinstance(reply, (Response, OpenStream)):
                reply = await reply
        except Exception:
            server_logger.exception("handler failed: %s %s", request.method, request.path)
            reply = Response(500, b"internal server error\n")
        # No await between the handler's result and the stream's attachment:
        # it joins its topics in the same loop step they were subscribed in.
        cors = self.router.cors(request)
        if isinstance(reply, OpenStream):
            await self._stream(scope, receive, send, reply, cors)
        else:
            await self._respond(scope, send, reply, cors, head=request.method == "HEAD")

    async def _request(self, scope: Scope, receive: Receive) -> Request | Response | None:
        """The request, or the refusal to send, or None if the client left."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = bytes(raw_name).decode("latin-1").lower()
            value = bytes(raw_value).decode("latin-1")
            previous = headers.get(name)
            headers[name] = value if previous is None else previous + ", " + value
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > limit:
                    return Response(413, b"request body too large\n")
            except ValueError:
                return Response(400, b"invalid Content-Length\n")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # gone before the body was complete: nothing to do
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                return Response(413, b"request body too large\n")
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return Request(
            scope["method"],
            _route_path(scope),
            bytes(scope.get("query_string", b"")).decode("latin-1"),
            headers,
            b"".join(chunks),
            True,
            _peer(scope),
        )

    def _headers(
        self, scope: Scope, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        out = [_SERVER_HEADER]
        out += [(name.lower(), value) for name, value in headers]
        if scope.get("http_version", "1.1") not in ("1.0", "1.1"):
            out = [h for h in out if h[0] != b"connection"]  # HTTP/2+ forbids it
        return out

    async def _respond(
        self,
        scope: Scope,
        send: Send,
        reply: Response,
        cors: list[tuple[bytes, bytes]],
        *,
        head: bool = False,
    ) -> None:
        """A whole response, with the headers gochan's server would send."""
        status, body = reply.status, reply.body
        headers: list[tuple[bytes, bytes]] = []
        ctype = reply.content_type
        bare = ctype is None  # a bare head (HEAD of the event stream)
        if ctype is not None and (body or status not in (204, 304)):
            headers.append((b"content-type", ctype))
        headers += reply.headers + cors
        if not bare and status not in (204, 304):
            headers.append((b"content-length", b"%d" % len(body)))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._headers(scope, headers),
            }
        )
        if head or bare or status in (204, 304):
            body = b""
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        reply: OpenStream,
        cors: list[tuple[bytes, bytes]],
    ) -> None:
        if self._exiting:
            await self._respond(scope, send, Response(503, b"shutting down\n"), cors)
            return
        loop = asyncio.get_running_loop()
        config = self.config
        transport = _StreamTransport(loop, config.write_buffer_high_bytes, config.shutdown_grace)
        # Only the SSE preamble: the ASGI server writes the HTTP head.
        sub = self.streamer.open_stream(
            reply.client, transport, reply.preamble, reply.last_event_id, self, reply.token_exp
        )
        transport.attach(sub)
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": self._headers(scope, reply.headers + cors),
        }
        pump = transport.pump_task = loop.create_task(transport.pump(send, start))
        watch = loop.create_task(_until_disconnect(receive))
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.streamer.detach(sub)
            transport.release()
            for task in (pump, watch):
                task.cancel()
            await asyncio.gather(pump, watch, return_exceptions=True)
        if watch.done() and not watch.cancelled():
            return  # the client went away
        if not pump.cancelled():
            exc = pump.exception()
            if exc is not None:
                server_logger.debug("event stream send failed: %r", exc)
            return  # ended cleanly with the last chunk, or the server refused
        # Dropped by gochan (slow consumer, or the close did not flush in
        # time): end the response if the server takes it at once.
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await within(send(_end()), DEFAULT_END_TIMEOUT_S)


def _chain_exit_signals(callback: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``callback`` on the loop when SIGINT/SIGTERM arrive, then the
    Python handler already installed (the ASGI server's); returns the undo.
    Signals with no Python handler (default or ignored) are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return None
    loop = asyncio.get_running_loop()
    previous: dict[int, Callable[[int, FrameType | None], Any]] = {}

    def handler(sig: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        previous[sig](sig, frame)

    for sig in _EXIT_SIGNALS:
        current = signal.getsignal(sig)
        if callable(current):
            previous[sig] = current
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, old)

    return restore
