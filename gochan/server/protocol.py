"""The HTTP/1.1 connection: httptools callbacks on a raw asyncio Protocol.

Ordinary requests are parsed, queued (pipelining) and answered in order; a
handler that must wait on the broker runs as a task and holds the queue until
it is done. A request for the event stream turns the connection into an SSE
stream: from then on it belongs to the fan-out hub and reads are discarded.

What a peer can make the server hold is bounded: input is parsed in slices
and parsing stops (the rest kept, reading paused) while the pipeline is full
or the peer is not reading its answers, so unread answers never pile up past
the transport's high-water mark. A connection closed with answers its peer
never reads is aborted at the next deadline instead of lingering.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, cast

import httptools

from .._fast import PUBLISH_DECLINED, PUBLISH_INCOMPLETE, PublishParser
from ..log import server_logger
from ..stream import Stream
from .http import (
    JSON,
    NO_PEER,
    Peer,
    Request,
    json_ok,
    response_head,
    simple_response,
    stream_head,
)
from .routes import Headers, OpenStream, Reply, Response

if TYPE_CHECKING:
    from .app import Server

__all__ = ["HttpProtocol"]

# Parsed requests waiting for their turn; past this, parsing and reading pause.
MAX_PIPELINE = 32
# Input is parsed this many bytes at a time, so one read of tiny pipelined
# requests cannot queue more than a slice's worth past MAX_PIPELINE.
FEED_SLICE_BYTES = 4096
# A connection closed gracefully gets this long to take its last answer.
CLOSE_LINGER_S = 5.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The end of a read that begins a fast-path publish is kept for the next
# read if it is at most this long, for at most this many reads; past that,
# httptools reads it (the fast path rescans what it keeps on every read).
HOLD_MAX_BYTES = FEED_SLICE_BYTES
HOLD_MAX_READS = 8


# The pipeline and answer list of a connection that is closing or closed:
# empty tuples, shared and never written (a write to them would raise).
_NO_REQUESTS = cast("list[Request]", ())
_NO_ANSWERS = cast("list[bytes]", ())
_NO_EXTRA: Headers = []

# An error answer: status, message, extra headers (a 405's Allow).
Refusal = tuple[int, str, Headers]


# The connection's state: one word of named bits. They are not exclusive: a
# request can be read while the one before it waits on the broker, and flow
# control (the two pauses) is independent of both.
ADMITTED = 1  # counted in by the server; connection_lost counts it out
IN_REQUEST = 2  # a request has begun and is not complete
BUSY = 4  # a handler is awaited: the requests behind it wait
READ_PAUSED = 8  # the transport is not reading (pipeline full, peer not reading)
WRITE_PAUSED = 16  # the transport holds more than its high-water mark: the peer
# is not reading its answers, so no more requests are run until it does
CLOSING = 32  # closing or closed: nothing more is run or written
FAST_BEGUN = 64  # the request in progress was begun on the publish fast path
# (kept in _held, or handed on to httptools since): its deadline is set,
# from its first byte, and on_message_begin keeps it


class _Rejected(Exception):
    """Raised inside a parser callback to stop parsing with an HTTP error."""


class HttpProtocol(asyncio.Protocol):
    # A connection accepted here takes a token of its address's connection
    # rate; one another worker accepted and passed on has taken it there.
    new_connection = True
    # Single publishes and plain connects may be read on the server's fast
    # paths (when it has them).
    fast_publish = True
    fast_connect = True

    __slots__ = (
        "_body",
        "_body_len",
        "_continue",
        "_failure",
        "_header_bytes",
        "_headers",
        "_held",
        "_out",
        "_out_bytes",
        "_reject",
        "_unparsed",
        "_url",
        "_url_len",
        "config",
        "deadline",
        "parser",
        "peer",
        "pipeline",
        "server",
        "state",
        "stream",
        "task",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.transport: asyncio.Transport | None = None
        # Made for the first request httptools reads: a connect taken on the
        # fast path never needs one. None again once a stream has begun.
        self.parser: httptools.HttpRequestParser | None = None
        # A list, not a deque: an empty list is far smaller, and it stays short.
        self.pipeline: list[Request] = []
        self.state = 0  # the bits below: nothing yet
        self.task: asyncio.Task[None] | None = None
        self.stream: Stream | None = None
        self.peer: Peer = NO_PEER
        # Monotonic time by which the current wait must end: the request's
        # header timeout, or the idle keep-alive timeout between requests.
        self.deadline = time.monotonic() + self.config.header_timeout
        self._reject: Refusal | None = None
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_len = 0
        # Answers to pipelined requests, written together once the batch is done.
        self._out: list[bytes] = []
        self._out_bytes = 0
        # Input not parsed yet because the pipeline was full (reading is paused).
        self._unparsed = b""
        # The request being read asked for "100 Continue" and has not had it.
        self._continue = False
        # A malformed request's error, answered once the requests before it are.
        self._failure: Refusal | None = None
        # The start of a request the publish fast path waits to have whole,
        # and how many reads it has waited (an empty tuple: none).
        self._held: tuple[bytes, int] | tuple[()] = ()

    @property
    def busy(self) -> bool:
        """A handler is awaited."""
        return bool(self.state & BUSY)

    @property
    def closing(self) -> bool:
        return bool(self.state & CLOSING)

    def close_soon(self) -> None:
        """Mark it closing (the server's shutdown closes the transport)."""
        self.state |= CLOSING

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        refused = self.server.admit(self, transport.get_extra_info("peername"))
        if refused is not None:
            status, message, headers = refused
            self.state |= CLOSING
            body = message.encode() + b"\n"
            answer = simple_response(status, body, headers=headers, keep_alive=False)
            transport.write(answer)
            transport.close()
            log = self.server.access_log
            if log is not None:
                peername = transport.get_extra_info("peername")
                log.unparsed(str(peername[0]) if peername else NO_PEER, status, len(answer))
            return
        transport.set_write_buffer_limits(high=self.config.write_buffer_high_bytes)

    def connection_lost(self, exc: Exception | None) -> None:
        # A stream's connection ends in Stream.connection_lost (start_stream).
        self.state |= CLOSING
        if self.task is not None:
            self.task.cancel()
            self.task = None
        self.pipeline = _NO_REQUESTS
        self._unparsed = b""
        self._held = ()
        self._out = _NO_ANSWERS
        self.server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self.stream is not None or (self.state & CLOSING):
            return  # nothing is read from an event stream
        if self._unparsed:  # a read that raced pause_reading: keep it in order
            self._unparsed += data
            return
        if self._held:  # the start of a fast-path publish: this read goes on from it
            start, reads = self._held
            self._held = ()
            self._input(start + data, reads)
            return
        self._input(data)

    def eof_received(self) -> bool:
        # A half-closed client gets its pending answers, then the close.
        return bool((self.state & BUSY) or self.pipeline or self._unparsed)

    def pause_writing(self) -> None:
        self.state |= WRITE_PAUSED
        self._pause_reading()  # stop reading requests whose answers the peer does not read

    def resume_writing(self) -> None:
        self.state &= ~WRITE_PAUSED
        self._run()
        self._continue_input()

    # -- reading -----------------------------------------------------------

    def _input(self, data: bytes, held_reads: int = 0) -> None:
        """Read ``data``: single publishes on the fast path while the
        connection is idle (nothing before them waits for an answer), the
        rest with httptools; a plain connect that is the whole read, with no
        request before it, on the connect fast path. ``held_reads``:
        ``data`` begins with a request the fast path kept over that many
        reads."""
        connect = self.server.connect_parser
        if (
            connect is not None
            and self.fast_connect
            and not (self.state & (IN_REQUEST | BUSY | WRITE_PAUSED | CLOSING))
            and not self.pipeline
            and self._failure is None
        ):
            topics = connect.parse(data)
            if topics is not None and self._connect_fast(topics):
                return
        parser = self.server.publish_parser
        if (
            parser is not None
            and self.fast_publish
            and not (self.state & (BUSY | WRITE_PAUSED | CLOSING))
            and (not (self.state & IN_REQUEST) or held_reads)
            and not self.pipeline
            and self._failure is None
        ):
            self._feed_fast(parser, data, held_reads)
            return
        self._feed(data)  # a kept start too: httptools reads it from here on

    def _connect_fast(self, topics: list[str]) -> bool:
        """Answer the connect the fast path read, as the events route
        answers it; False, with nothing done, when it must be read again on
        the slow path (a topic that is not valid)."""
        try:
            reply = self.server.router.events_fast(self.peer, topics)
        except Exception:
            server_logger.exception("handler failed: GET %s", self.config.events_path)
            self.fail(500, "internal server error")
            return True
        if reply is None:
            return False
        # What the answer needs of the request: keep-alive, no Origin (so no
        # CORS headers); the access log is off on this path.
        request = Request("GET", self.config.events_path, "", {}, b"", True, self.peer)
        self._answer(reply, request)
        self._run()  # what follows an answer: the flush, the keep-alive deadline
        return True

    def _feed_fast(self, parser: PublishParser, data: bytes, held_reads: int) -> None:
        """Answer the fast-path publishes at the start of ``data`` in order,
        in one write; hand what follows the last of them to httptools, or
        keep it when it is the start of another one."""
        if not data:
            return
        parse = parser.parse
        publish = self.server.router.publish_fast
        peer = self.peer
        out = self._out
        high = self.config.write_buffer_high_bytes
        size = len(data)
        pos = 0
        got: object = PUBLISH_INCOMPLETE
        while pos < size:
            got = parse(data, pos)
            if type(got) is int:
                break
            end, topic, body, host, origin, authorization = got  # type: ignore[misc]
            try:
                answer = publish(peer, topic, body, host, origin, authorization)
            except Exception:
                server_logger.exception("handler failed: POST %s", self.config.publish_path)
                self.fail(500, "internal server error")
                return
            if answer is None:  # not a plain success: the slow path answers it
                got = PUBLISH_DECLINED
                break
            # What deliver() writes for these: no CORS header (publish_fast
            # declines those), keep-alive, not HEAD.
            if type(answer) is bytes:
                data_out = json_ok(answer)
            else:
                data_out = simple_response(answer.status, answer.body)  # type: ignore[union-attr]
            out.append(data_out)
            self._out_bytes += len(data_out)
            pos = end
            if self._out_bytes >= high:
                self._flush_out()  # may pause writing: the peer must read first
                if self.state & (WRITE_PAUSED | CLOSING):
                    break
        if pos:  # what was begun, or kept, before is answered
            held_reads = 0
            self.state &= ~(IN_REQUEST | FAST_BEGUN)
        if pos == size or (self.state & (WRITE_PAUSED | CLOSING)):
            self._flush_out()
            if self.state & CLOSING:
                return
            self.deadline = time.monotonic() + self.config.keepalive_timeout
            if pos < size:  # the peer does not read: the rest waits, as in _feed
                self._unparsed = data[pos:]
                self._pause_reading()
            return
        rest = data[pos:] if pos else data
        if (
            got == PUBLISH_INCOMPLETE
            and len(rest) <= HOLD_MAX_BYTES
            and held_reads < HOLD_MAX_READS
        ):
            self._flush_out()
            self._held = (rest, held_reads + 1)
            if not (self.state & IN_REQUEST):  # as on_message_begin: from its first byte
                self.deadline = time.monotonic() + self.config.header_timeout
                self.state |= IN_REQUEST | FAST_BEGUN
            return
        # httptools is between two requests: it reads on from this one.
        self._feed(rest)

    def _blocked(self) -> bool:
        """No more input is parsed now: too many requests wait, the peer does
        not read its answers, or an error is waiting to be answered."""
        return bool(
            self.state & (WRITE_PAUSED | CLOSING)
            or len(self.pipeline) >= MAX_PIPELINE
            or self._failure is not None
        )

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
        size = len(data)
        pos = 0
        while pos < size:
            if self._blocked():
                if self._failure is None:  # past a malformed request nothing is parsed
                    self._unparsed = data[pos:]
                    self._pause_reading()
                return
            chunk = data if size <= FEED_SLICE_BYTES else data[pos : pos + FEED_SLICE_BYTES]
            pos += len(chunk)
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserUpgrade:
                if self.pipeline and not (self.state & IN_REQUEST):
                    self.pipeline.pop()  # the upgrade request itself is not run
                self._failed(400, "protocol upgrades are not supported", _NO_EXTRA)
            except httptools.HttpParserError:
                self._failed(*(self._reject or (400, "malformed HTTP request", _NO_EXTRA)))
            self._run()
            if self.stream is not None or (self.state & CLOSING):
                return  # a stream began, or the connection is ending

    def _continue_input(self) -> None:
        """The pipeline has room again: parse what was kept, then read on."""
        if self._blocked() or self.stream is not None:
            return
        if self._unparsed:
            data, self._unparsed = self._unparsed, b""
            self._input(data)
        if not self._unparsed and (self.state & READ_PAUSED) and not self._blocked():
            self._resume_reading()

    def _pause_reading(self) -> None:
        if (
            self.transport is not None
            and not (self.state & READ_PAUSED)
            and not (self.state & CLOSING)
        ):
            self.state |= READ_PAUSED
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not (self.state & CLOSING):
            self.state &= ~READ_PAUSED
            self.transport.resume_reading()

    # -- httptools callbacks -----------------------------------------------

    def _stop(self, status: int, message: str, headers: Headers = _NO_EXTRA) -> None:
        self._reject = (status, message, headers)
        raise _Rejected(message)

    def on_message_begin(self) -> None:
        self.state |= IN_REQUEST
        self._continue = False
        if self.state & FAST_BEGUN:  # the fast path kept its start: timed from then
            self.state &= ~FAST_BEGUN
        else:
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
        if self._headers.get("expect", "").lower() == "100-continue":
            # A request that will be refused gets the refusal, not an
            # invitation to send its body; the rest get "100 Continue" once
            # every answer before theirs is out (see _run).
            parser = self.parser
            assert parser is not None
            try:
                path = (httptools.parse_url(b"".join(self._url)).path or b"/").decode("latin-1")
            except httptools.HttpParserInvalidURLError:
                self._stop(400, "invalid request target")
            refused = self.server.router.refuse_early(
                parser.get_method().decode("ascii", "replace"), path, self._headers, self.peer
            )
            if refused is not None:
                self._stop(*refused)
            self._continue = True

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
        self.state &= ~IN_REQUEST
        self._continue = False  # the body is here: no need to invite it
        self.pipeline.append(
            Request(
                parser.get_method().decode("ascii", "replace"),
                (parsed.path or b"/").decode("latin-1"),
                (parsed.query or b"").decode("latin-1"),
                self._headers,
                b"".join(self._body),
                parser.should_keep_alive(),
                self.peer,
                time.monotonic() if self.server.access_log is not None else 0.0,
            )
        )

    # -- running requests --------------------------------------------------

    def _run(self) -> None:
        while (
            self.pipeline
            and not (self.state & BUSY)
            and not (self.state & WRITE_PAUSED)
            and self.stream is None
            and not (self.state & CLOSING)
        ):
            request = self.pipeline.pop(0)
            try:
                reply = self.server.router.dispatch(request)
            except Exception:
                server_logger.exception("handler failed: %s %s", request.method, request.path)
                self.fail(500, "internal server error", request=request)
                return
            if not self._answer(reply, request):
                return
        if (
            (self.state & CLOSING)
            or self.stream is not None
            or (self.state & BUSY)
            or self.pipeline
        ):
            self._flush_out()
            return
        # Every request read so far is answered.
        if self._failure is not None:
            self.fail(*self._failure)
            return
        if self._continue and not (self.state & WRITE_PAUSED):
            self._continue = False
            self._out.append(CONTINUE)
        self._flush_out()
        if not (self.state & IN_REQUEST):
            self.deadline = time.monotonic() + self.config.keepalive_timeout

    def _answer(self, reply: Reply | Awaitable[Reply], request: Request) -> bool:
        """Deliver a handler's reply, or await it; False when the requests
        behind it must wait (it is awaited) or the delivery failed."""
        if isinstance(reply, (Response, OpenStream)):
            if not self._deliver_safely(reply, request):
                return False
            if self._out_bytes >= self.config.write_buffer_high_bytes:
                self._flush_out()  # may pause writing: the peer must read first
            return True
        self._flush_out()
        self.state |= BUSY
        self.task = asyncio.get_running_loop().create_task(self._finish(reply, request))
        return False

    async def _finish(self, pending: Awaitable[Reply], request: Request) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:
            raise
        except Exception:
            server_logger.exception("handler failed: %s %s", request.method, request.path)
            self.fail(500, "internal server error", request=request)
            return
        finally:
            self.state &= ~BUSY
            self.task = None
        # No await between the handler's result and its delivery: a stream
        # is attached in the same loop step its subscriptions were made in.
        if not self._deliver_safely(reply, request):
            return
        if not (self.state & CLOSING):
            self._run()
            self._continue_input()

    def _deliver_safely(self, reply: Reply, request: Request) -> bool:
        """deliver(), with a failure answered as a 500 (and logged) instead of
        escaping into the loop; False when it failed."""
        try:
            self.deliver(reply, request)
        except Exception:
            server_logger.exception("answer failed: %s %s", request.method, request.path)
            self.fail(500, "internal server error", request=request)
            return False
        return True

    # -- used by the routes ------------------------------------------------

    def deliver(self, reply: Reply, request: Request) -> None:
        """Write a handler's reply: a whole response, or the start of a stream."""
        if (self.state & CLOSING) or self.transport is None:
            return
        cors = self.server.router.cors(request)
        if isinstance(reply, OpenStream):
            self._flush_out()
            head = response_head(200, reply.headers + cors) if cors else stream_head(reply.headers)
            stream = self.start_stream(head + reply.preamble, reply)
            log = self.server.access_log
            if log is not None:
                log.stream_opened(stream, request)
            return
        if reply.content_type is None:  # a bare head (HEAD of the event stream)
            data = response_head(reply.status, reply.headers + cors, keep_alive=request.keep_alive)
        elif (
            reply.status == 200
            and reply.content_type is JSON
            and not reply.headers
            and not cors
            and request.keep_alive
            and request.method != "HEAD"
        ):  # a publish's answer, the common case
            data = json_ok(reply.body)
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
        self._out_bytes += len(data)
        log = self.server.access_log
        if log is not None:
            log.response(request, reply.status, len(data))
        if not request.keep_alive:
            self._close_after_flush()

    def _flush_out(self) -> None:
        out = self._out
        if out and self.transport is not None:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self._out_bytes = 0
            self.transport.write(data)

    def _close_after_flush(self) -> None:
        """Write what is pending and close; the tick aborts the connection if
        the peer has not taken it within CLOSE_LINGER_S."""
        self._flush_out()
        self.state |= CLOSING
        self.pipeline = _NO_REQUESTS
        self._unparsed = b""
        self._held = ()
        self.deadline = time.monotonic() + CLOSE_LINGER_S
        if self.transport is not None:
            self.transport.close()

    def _failed(self, status: int, message: str, headers: Headers) -> None:
        """A malformed request: answer it after the requests before it."""
        self.server.metrics.malformed(status)
        self._failure = (status, message, headers)
        self.state &= ~IN_REQUEST

    def fail(
        self,
        status: int,
        message: str,
        headers: Headers = _NO_EXTRA,
        request: Request | None = None,
    ) -> None:
        """Answer with an error and close the connection (bad input, or
        ``request``'s handler failed)."""
        if self._failure is None:
            self.server.metrics.malformed(status)
        self._failure = None
        if self.transport is None or (self.state & CLOSING):
            return
        if self.stream is not None:  # a stream has begun: no answer can follow
            self.state |= CLOSING
            self.transport.abort()
            return
        body = message.encode() + b"\n"
        answer = simple_response(status, body, headers=headers, keep_alive=False)
        self._out.append(answer)
        log = self.server.access_log
        if log is not None:
            if request is None:
                log.unparsed(self.peer, status, len(answer))
            else:
                log.response(request, status, len(answer))
        self._close_after_flush()

    def start_stream(self, head: bytes, reply: OpenStream) -> Stream:
        """Send the response head and first frames, then hand the connection
        to the hub. Nothing is awaited between the two, so no message can
        fall between the first frame and live delivery. From then on the
        stream is the transport's protocol, and this object is let go."""
        transport = self.transport
        assert transport is not None
        stream = self.server.streamer.open_stream(
            reply.client, transport, head, reply.last_event_id, self.server, reply.token_exp
        )
        stream.peer = self.peer
        self.stream = stream  # what is still running here stops at it
        transport.set_protocol(stream)
        self.parser = None  # it refers back to this object
        self.server.streaming(self)
        if self.state & READ_PAUSED:  # paused while the head was written; streams read (EOF)
            self._resume_reading()
        return stream

    def expire(self, now: float) -> None:
        """Called by the server tick once the deadline has passed."""
        transport = self.transport
        if (self.state & BUSY) or self.stream is not None or transport is None:
            return
        if self.state & CLOSING:
            transport.abort()  # closed, and its peer never took the last answer
        elif (self.state & WRITE_PAUSED) or transport.get_write_buffer_size():
            # Answers the peer does not read: an error answer would only wait too.
            self.state |= CLOSING
            transport.abort()
        elif (self.state & IN_REQUEST) or self.pipeline or self._unparsed:
            self.fail(408, "request timeout")
        else:
            self.state |= CLOSING
            transport.close()
