"""The HTTP/1.1 connection: httptools callbacks on a raw asyncio Protocol.

Ordinary requests are parsed, queued (pipelining) and answered in order; a
handler that must wait on the broker runs as a task and holds the queue until
it is done. A request for the event stream turns the connection into an SSE
stream: from then on it belongs to the fan-out hub and reads are discarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast

import httptools

from .._fast import Subscriber
from ..log import server_logger
from .http import Request, response_head, simple_response
from .routes import OpenStream, Reply, Response

if TYPE_CHECKING:
    from .app import Server

__all__ = ["HttpProtocol"]

# Parsed requests waiting for their turn; past this, reading pauses.
MAX_PIPELINE = 32


# Shared, never written: see start_stream.
_NO_HEADERS: dict[str, str] = {}
_NO_PARTS: list[bytes] = []


class _Rejected(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error."""


class HttpProtocol(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_len",
        "_header_bytes",
        "_headers",
        "_out",
        "_reject",
        "_url",
        "_url_len",
        "admitted",
        "busy",
        "closing",
        "config",
        "deadline",
        "in_request",
        "parser",
        "pipeline",
        "reading_paused",
        "server",
        "stream",
        "task",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        # A list, not a deque: an empty list is far smaller, and it stays short.
        self.pipeline: list[Request] = []
        self.admitted = False
        self.busy = False
        self.task: asyncio.Task[None] | None = None
        self.stream: Subscriber | None = None
        self.closing = False
        self.reading_paused = False
        self.in_request = False
        # Monotonic time by which the current wait must end: the request's
        # header timeout, or the idle keep-alive timeout between requests.
        self.deadline = time.monotonic() + self.config.header_timeout
        self._reject: tuple[int, str] | None = None
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        # Answers to pipelined requests, written together once the batch is done.
        self._out: list[bytes] = []

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self.server.admit(self):
            self.closing = True
            transport.write(simple_response(503, b"too many connections\n", keep_alive=False))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.config.write_buffer_high_bytes)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.stream is not None:
            self.server.streamer.detach(self.stream)
            self.stream = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.pipeline.clear()
        self.server.forget(self)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.closing:
            return  # nothing is read from an event stream
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError:
            status, message = self._reject or (400, "malformed HTTP request")
            self.fail(status, message)
            return
        self._run()

    def eof_received(self) -> bool:
        # A half-closed client gets its pending answers, then the close.
        return bool(self.busy or self.pipeline)

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.pause()
        elif self.transport is not None and not self.reading_paused:
            # Stop reading requests whose answers the peer does not read.
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.resume()
            self.server.streamer.resume_replay(self.stream)
        elif self.reading_paused and len(self.pipeline) < MAX_PIPELINE:
            self._resume_reading()

    # -- httptools callbacks -----------------------------------------------

    def _stop(self, status: int, message: str) -> None:
        self._reject = (status, message)
        raise _Rejected(message)

    def on_message_begin(self) -> None:
        self.in_request = True
        self.deadline = time.monotonic() + self.config.header_timeout
        self._url = []
        self._url_len = 0
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url_len += len(url)
        if self._url_len > self.config.max_url_bytes:
            self._stop(431, "request line too long")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self.config.max_header_bytes:
            self._stop(431, "request headers too large")
        if len(self._headers) >= self.config.max_headers:
            self._stop(431, "too many request headers")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else previous + ", " + text

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.config.max_body_bytes
            except ValueError:
                self._stop(400, "invalid Content-Length")
            if too_big:
                self._stop(413, "request body too large")
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport:
            self._out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._flush_out()  # after the answers before it, and now: the client waits

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.config.max_body_bytes:
            self._stop(413, "request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # callbacks run only inside feed_data
        url = b"".join(self._url)
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            self._stop(400, "invalid request target")
        self.in_request = False
        self.pipeline.append(
            Request(
                parser.get_method().decode("ascii", "replace"),
                (parsed.path or b"/").decode("latin-1"),
                (parsed.query or b"").decode("latin-1"),
                self._headers,
                b"".join(self._body),
                parser.should_keep_alive(),
            )
        )
        if len(self.pipeline) >= MAX_PIPELINE and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    # -- running requests --------------------------------------------------

    def _run(self) -> None:
        while self.pipeline and not self.busy and self.stream is None and not self.closing:
            request = self.pipeline.pop(0)
            try:
                reply = self.server.router.dispatch(request)
            except Exception:
                server_logger.exception("handler failed: %s %s", request.method, request.path)
                self.fail(500, "internal server error")
                return
            if isinstance(reply, (Response, OpenStream)):
                self.deliver(reply, request)
            else:
                self._flush_out()
                self.busy = True
                self.task = asyncio.get_running_loop().create_task(self._finish(reply, request))
                return
        self._flush_out()
        if self.reading_paused and len(self.pipeline) < MAX_PIPELINE // 2:
            self._resume_reading()
        if not self.busy and not self.pipeline and not self.in_request:
            self.deadline = time.monotonic() + self.config.keepalive_timeout

    async def _finish(self, pending: Awaitable[Reply], request: Request) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            server_logger.exception("handler failed: %s %s", request.method, request.path)
            self.fail(500, "internal server error")
            return
        finally:
            self.busy = False
            self.task = None
        # No await between the handler's result and its delivery: a stream
        # is attached in the same loop step its subscriptions were made in.
        self.deliver(reply, request)
        if not self.closing:
            self._run()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.closing:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- used by the routes ------------------------------------------------

    def deliver(self, reply: Reply, request: Request) -> None:
        """Write a handler's reply: a whole response, or the start of a stream."""
        if self.closing or self.transport is None:
            return
        cors = self.server.router.cors(request)
        if isinstance(reply, OpenStream):
            self._flush_out()
            head = response_head(200, reply.headers + cors, keep_alive=True)
            self.start_stream(head + reply.preamble, reply)
            return
        if reply.content_type is None:  # a bare head (HEAD of the event stream)
            data = response_head(reply.status, reply.headers + cors, keep_alive=request.keep_alive)
        else:
            data = simple_response(
                reply.status,
                reply.body,
                content_type=reply.content_type,
                headers=reply.headers + cors,
                keep_alive=request.keep_alive,
                head=request.method == "HEAD",
            )
        self._out.append(data)
        if not request.keep_alive:
            self._flush_out()
            self.closing = True
            self.transport.close()

    def _flush_out(self) -> None:
        out = self._out
        if out and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def fail(self, status: int, message: str) -> None:
        """Answer with an error and close the connection (bad input)."""
        self.server.bad_requests += 1
        if self.transport is None or self.closing:
            return
        self.closing = True
        body = message.encode() + b"\n"
        self._out.append(simple_response(status, body, keep_alive=False))
        self._flush_out()
        self.transport.close()

    def start_stream(self, head: bytes, reply: OpenStream) -> None:
        """Send the response head and first frames, then hand the connection
        to the hub. Nothing is awaited between the two, so no message can
        fall between the first frame and live delivery."""
        assert self.transport is not None
        self.stream = self.server.streamer.open_stream(
            reply.client, self.transport, head, reply.last_event_id
        )
        # Nothing more is parsed on this connection: free the parser state.
        self.parser = None
        self.pipeline.clear()
        # Parse state is replaced whole by on_message_begin before any use, so
        # a stream can point at shared empties rather than own three containers.
        self._headers = _NO_HEADERS
        self._url = self._body = _NO_PARTS
        self.server.streaming(self)
        if self.reading_paused:  # paused while the head was written; streams read (EOF)
            self._resume_reading()

    def expire(self, now: float) -> None:
        """Called by the server tick once the deadline has passed."""
        if self.busy or self.stream is not None or self.closing:
            return
        if self.in_request or self.pipeline:
            self.fail(408, "request timeout")
        elif self.transport is not None:
            self.closing = True
            self.transport.close()
