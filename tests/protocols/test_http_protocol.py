"""HttpProtocol driven by hand: a fake transport (tests/protocols/fakes.py)
instead of a socket, and a clock the test moves instead of sleeping.

Each test feeds bytes to ``data_received``, moves the clock and runs the
server's sweep with a chosen ``now``, and asserts the exact bytes written
(the Date header's value masked) and the transport's state. The Streamer is
real (mem driver) and so is the Server, which never listens."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import pytest

from gochan import Config, Streamer
from gochan.server import Server
from gochan.server import protocol as protocol_module
from gochan.server.protocol import HttpProtocol

from .fakes import FakeClock, FakeTransport, undated

# The protocol's bounds on what a peer can make it hold (see protocol.py).
PIPELINE_LIMIT = 32
SLICE = 4096
CLOSE_LINGER_S = 5.0
KEEPALIVE_S = 75.0
HEADER_TIMEOUT_S = 10.0


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The protocol's deadlines read this clock, not the real one."""
    fake = FakeClock()
    monkeypatch.setattr(protocol_module, "time", fake)
    return fake


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Server]:
    """A started Streamer (mem driver) and a Server that never listens.
    ``sweep=False``: the streamer's real tick never runs the server's
    sweep; the tests call it themselves with the ``now`` they choose."""
    config = Config(**options)
    streamer = Streamer(config)
    await streamer.start()
    server = Server(streamer, config, sweep=False)
    try:
        yield server
    finally:
        await streamer.close()


def connect(
    server: Server, peername: object = ("10.0.0.1", 40000)
) -> tuple[HttpProtocol, FakeTransport]:
    proto = server.protocol_factory()
    transport = FakeTransport(peername).connect(proto)
    return proto, transport


async def settle() -> None:
    """Let the loop run what was scheduled (the hub's flush, a task's step)."""
    for _ in range(3):
        await asyncio.sleep(0)


def sweep(server: Server, clock: FakeClock, now: float) -> None:
    clock.now = now
    server._tick(now)


def answer(
    status: int,
    body: bytes,
    *,
    close: bool = False,
    headers: bytes = b"",
    ctype: bytes = b"text/plain; charset=utf-8",
) -> bytes:
    """The exact bytes of a gochan answer with a Content-Length, Date masked."""
    reason = HTTPStatus(status).phrase.encode()
    return (
        b"HTTP/1.1 %d %s\r\nServer: gochan\r\nDate: *\r\n" % (status, reason)
        + b"Content-Type: " + ctype + b"\r\n"
        + headers
        + b"Content-Length: %d\r\n" % len(body)
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )  # fmt: skip


def get(path: str, *headers: str) -> bytes:
    extra = "".join(h + "\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


HEALTHZ = get("/healthz")
OK = answer(200, b"ok\n")
READY = answer(200, b"ready\n")
NOT_FOUND = answer(404, b"not found\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# -- keep-alive and close ----------------------------------------------------


async def test_get_answered_and_kept_alive() -> None:
    async with serving() as server:
        proto, t = connect(server)
        proto.data_received(HEALTHZ)
        assert [undated(w) for w in t.writes] == [OK]
        proto.data_received(get("/readyz"))
        assert [undated(w) for w in t.writes] == [OK, READY]
        assert not t.is_closing()
        assert t.reading


async def test_connection_close_answered_then_closed() -> None:
    async with serving() as server:
        proto, t = connect(server)
        proto.data_received(get("/healthz", "Connection: close"))
        assert [undated(w) for w in t.writes] == [answer(200, b"ok\n", close=True)]
        assert t.closed and not t.aborted
        proto.data_received(HEALTHZ)  # a read that raced the close: not run
        assert len(t.writes) == 1


async def test_pipelined_requests_answered_in_order_in_one_write() -> None:
    async with serving() as server:
        proto, t = connect(server)
        proto.data_received(HEALTHZ + get("/nope") + get("/readyz") + HEALTHZ)
        assert [undated(w) for w in t.writes] == [OK + NOT_FOUND + READY + OK]
        assert not t.is_closing()


async def test_request_split_byte_by_byte() -> None:
    async with serving() as server:
        proto, t = connect(server)
        request = get("/healthz", "X-Long: " + "v" * 100)
        for i in range(len(request) - 1):
            proto.data_received(request[i : i + 1])
        assert t.writes == []
        proto.data_received(request[-1:])
        assert [undated(w) for w in t.writes] == [OK]


# -- a peer that does not read its answers ----------------------------------


async def test_peer_not_reading_pauses_requests_and_reading() -> None:
    high = 1024
    async with serving(write_buffer_high_bytes=high) as server:
        proto, t = connect(server)
        assert t.high_water == high
        t.peer_reads = False
        proto.data_received(HEALTHZ * 40)
        # The answers were flushed once they reached the high-water mark; the
        # transport then passed it and paused writing: nothing more is run.
        assert len(t.writes) == 1 and t.writing_paused
        first = undated(t.writes[0])
        done = first.count(b"HTTP/1.1 ")
        assert first == OK * done
        size = len(t.writes[0]) // done
        assert done == -(-high // size)  # the first batch at or past the mark
        assert len(proto.pipeline) == 40 - done
        assert not t.reading and t.pause_reading_calls == 1
        # A read that raced pause_reading is kept, not run.
        proto.data_received(get("/readyz"))
        assert len(t.writes) == 1
        t.drain()  # resume_writing: the rest are answered, reading resumes
        assert undated(t.wire) == OK * 40 + READY
        assert proto.pipeline == []
        assert t.reading and t.resume_reading_calls == 1
        assert not t.is_closing()


async def test_input_held_while_paused_is_bounded() -> None:
    tiny = b"GET / HTTP/1.1\r\n\r\n"
    count = 20_000
    data = tiny * count
    async with serving() as server:
        proto, t = connect(server)
        t.peer_reads = False
        proto.data_received(data)
        assert t.writing_paused and not t.reading
        answered = undated(t.wire).count(b"HTTP/1.1 404 ")
        kept = proto._unparsed
        parsed = len(data) - len(kept)
        assert 0 < parsed < len(data) and parsed % SLICE == 0 and data.endswith(kept)
        # Parsed and not run: a pipeline's worth plus at most one slice.
        assert len(proto.pipeline) <= PIPELINE_LIMIT + SLICE // len(tiny) + 1
        assert parsed - answered * len(tiny) <= PIPELINE_LIMIT * len(tiny) + SLICE
        assert len(proto.pipeline) == parsed // len(tiny) - answered
        t.drain()
        assert undated(t.wire) == NOT_FOUND * count
        assert proto.pipeline == [] and proto._unparsed == b""
        assert t.reading and not t.is_closing()


async def test_pipeline_full_while_a_handler_waits_is_bounded() -> None:
    tiny = b"GET / HTTP/1.1\r\n\r\n"
    count = 20_000
    async with serving() as server:
        client = server.streamer.create_client()
        body = b'{"client_id":"%s"}' % client.id.encode()
        update = b"POST /update_subscriptions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
        head = update + body
        data = head + tiny * count
        proto, t = connect(server)
        proto.data_received(data)
        # The update waits on the broker; the requests behind it queue up to
        # the pipeline limit, at most one slice past it, and the rest is kept.
        assert proto.busy and t.writes == [] and not t.reading
        assert PIPELINE_LIMIT <= len(proto.pipeline) <= PIPELINE_LIMIT + SLICE // len(tiny) + 1
        kept = proto._unparsed
        assert data.endswith(kept) and len(data) - len(kept) == SLICE  # one slice parsed
        assert len(proto.pipeline) == (len(data) - len(kept) - len(head)) // len(tiny)
        task = proto.task
        assert task is not None
        await task
        updated = b'{"client_id":"%s","subscriptions":[],"errors":[]}' % client.id.encode()
        assert (
            undated(t.wire) == answer(200, updated, ctype=b"application/json") + NOT_FOUND * count
        )
        assert proto.pipeline == [] and proto._unparsed == b"" and t.reading


# -- deadlines ----------------------------------------------------------------


async def test_keepalive_timeout_closes_idle_connection(clock: FakeClock) -> None:
    async with serving() as server:
        proto, t = connect(server)
        start = clock.now
        proto.data_received(HEALTHZ)
        sweep(server, clock, start + KEEPALIVE_S - 0.01)
        assert not t.is_closing()
        sweep(server, clock, start + KEEPALIVE_S)
        assert t.closed and not t.aborted
        assert [undated(w) for w in t.writes] == [OK]  # closed without a word


async def test_timed_out_connection_with_unread_answers_is_aborted(clock: FakeClock) -> None:
    async with serving() as server:
        proto, t = connect(server)
        t.peer_reads = False  # below the high-water mark: only buffered
        proto.data_received(HEALTHZ)
        assert t.get_write_buffer_size() > 0 and not t.writing_paused
        sweep(server, clock, clock.now + KEEPALIVE_S)
        assert t.aborted and not t.closed
        assert [undated(w) for w in t.writes] == [OK]


async def test_closing_connection_whose_peer_never_reads_is_aborted(clock: FakeClock) -> None:
    async with serving() as server:
        proto, t = connect(server)
        t.peer_reads = False
        start = clock.now
        proto.data_received(get("/healthz", "Connection: close"))
        assert t.closed and not t.aborted
        sweep(server, clock, start + CLOSE_LINGER_S - 0.01)
        assert not t.aborted
        sweep(server, clock, start + CLOSE_LINGER_S)
        assert t.aborted
        assert [undated(w) for w in t.writes] == [answer(200, b"ok\n", close=True)]


async def test_header_timeout_answers_408(clock: FakeClock) -> None:
    async with serving() as server:
        proto, t = connect(server)
        proto.data_received(HEALTHZ)
        clock.now += 30.0  # idle for a while, then a head that never ends
        started = clock.now
        proto.data_received(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        sweep(server, clock, started + HEADER_TIMEOUT_S - 0.01)
        assert len(t.writes) == 1 and not t.is_closing()
        sweep(server, clock, started + HEADER_TIMEOUT_S)
        assert undated(t.wire) == OK + answer(408, b"request timeout\n", close=True)
        assert t.closed and not t.aborted


# -- malformed and refused requests -------------------------------------------


async def test_malformed_request_after_two_good_ones() -> None:
    async with serving() as server:
        proto, t = connect(server)
        proto.data_received(HEALTHZ + get("/readyz") + b"BOGUS\x01 / HTTP/1.1\r\n\r\n" + HEALTHZ)
        bad = answer(400, b"malformed HTTP request\n", close=True)
        assert undated(t.wire) == OK + READY + bad
        assert t.closed
        assert server.bad_requests == 1


async def test_upgrade_request_refused_and_not_run() -> None:
    async with serving() as server:
        proto, t = connect(server)
        upgrade = get("/healthz", "Connection: Upgrade", "Upgrade: websocket")
        proto.data_received(get("/readyz") + upgrade)
        refused = answer(400, b"protocol upgrades are not supported\n", close=True)
        assert undated(t.wire) == READY + refused
        assert t.closed


# -- Expect: 100-continue ------------------------------------------------------

EXPECT_5 = b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
PUBLISH_HEAD = (
    b"POST /publish?topic=news HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\n" + EXPECT_5
)
# Nobody holds the topic: the message is published and seen lost (no id).
PUBLISHED = answer(200, b'{"id":null}', ctype=b"application/json")


async def test_continue_sent_only_after_previous_answers() -> None:
    async with serving(publish_key="k") as server:
        client = server.streamer.create_client()
        body = b'{"client_id":"%s","add":[]}' % client.id.encode()
        update = (
            b"POST /update_subscriptions HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        proto, t = connect(server)
        proto.data_received(update + body + PUBLISH_HEAD)
        # The update waits on the broker: no invitation while it is pending.
        assert t.writes == [] and proto.task is not None
        await proto.task
        updated = b'{"client_id":"%s","subscriptions":[],"errors":[]}' % client.id.encode()
        assert [undated(w) for w in t.writes] == [
            answer(200, updated, ctype=b"application/json") + CONTINUE
        ]
        proto.data_received(b"hello")
        assert [undated(w) for w in t.writes[1:]] == [PUBLISHED]


async def test_continue_not_sent_when_body_came_with_headers() -> None:
    async with serving(publish_key="k") as server:
        proto, t = connect(server)
        proto.data_received(PUBLISH_HEAD + b"hello")
        assert [undated(w) for w in t.writes] == [PUBLISHED]


@pytest.mark.parametrize(
    ("request_head", "refusal"),
    [
        (
            b"POST /nope HTTP/1.1\r\nHost: t\r\n" + EXPECT_5,
            answer(404, b"not found\n", close=True),
        ),
        (
            b"PUT /publish HTTP/1.1\r\nHost: t\r\n" + EXPECT_5,
            answer(405, b"method not allowed\n", close=True, headers=b"Allow: POST, OPTIONS\r\n"),
        ),
        (
            PUBLISH_HEAD.replace(b"Bearer k", b"Bearer wrong"),
            answer(
                401,
                b"missing or wrong publish key (Authorization: Bearer <key>)\n",
                close=True,
                headers=b'WWW-Authenticate: Bearer realm="gochan"\r\n',
            ),
        ),
    ],
    ids=["404", "405", "401"],
)
async def test_continue_refused_early(request_head: bytes, refusal: bytes) -> None:
    async with serving(publish_key="k") as server:
        proto, t = connect(server)
        proto.data_received(request_head)
        assert undated(t.wire) == refusal  # the refusal instead of "100 Continue"
        assert t.closed


# -- limits -----------------------------------------------------------------------

CHUNKED = (
    b"POST /publish?topic=news HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"400\r\n" + b"x" * 1024 + b"\r\n"
    + b"1\r\nx\r\n0\r\n\r\n"
)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "request_bytes", "status", "message"),
    [
        ({}, get("/" + "a" * 9000), 431, b"request line too long\n"),
        (
            {},
            get("/healthz", *[f"X-{i}: v" for i in range(101)]),
            431,
            b"too many request headers\n",
        ),
        (
            {},
            b"POST /publish?topic=news HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n",
            413,
            b"request body too large\n",
        ),
        ({"max_body_bytes": 1024}, CHUNKED, 413, b"request body too large\n"),
    ],
    ids=["long-url", "too-many-headers", "content-length", "chunked"],
)
async def test_limits(
    options: dict[str, Any], request_bytes: bytes, status: int, message: bytes
) -> None:
    async with serving(**options) as server:
        proto, t = connect(server)
        proto.data_received(request_bytes)
        assert undated(t.wire) == answer(status, message, close=True)
        assert t.closed


async def test_chunked_body_at_the_limit_is_read() -> None:
    async with serving(max_body_bytes=1025, publish_key="k") as server:
        proto, t = connect(server)
        proto.data_received(
            CHUNKED.replace(b"Host: t\r\n", b"Host: t\r\nAuthorization: Bearer k\r\n")
        )
        assert [undated(w) for w in t.writes] == [PUBLISHED]


# -- the peer share ---------------------------------------------------------------


async def test_peer_share_refuses_second_connection_until_first_is_lost() -> None:
    async with serving(max_connections=10) as server:  # share: 10 // 10 = 1
        first, t1 = connect(server, ("10.0.0.7", 1111))
        assert t1.writes == [] and not t1.is_closing()
        second, t2 = connect(server, ("10.0.0.7", 2222))
        refused = answer(503, b"too many connections from your address\n", close=True)
        assert undated(t2.wire) == refused and t2.closed
        _other, t3 = connect(server, ("10.0.0.8", 3333))  # another address has its own
        assert t3.writes == [] and not t3.is_closing()
        second.connection_lost(None)
        first.connection_lost(None)
        assert server.peers == {"10.0.0.8": 1} and server.connections == 1
        again, t4 = connect(server, ("10.0.0.7", 4444))
        assert t4.writes == [] and not t4.is_closing()
        again.data_received(HEALTHZ)
        assert [undated(w) for w in t4.writes] == [OK]


# -- the event stream ---------------------------------------------------------------

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: gochan\r\nDate: *\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache, no-store, must-revalidate, pre-check=0, post-check=0\r\n"
    b"Connection: keep-alive\r\nX-Accel-Buffering: no\r\n\r\n"
)
FIRST_FRAME = re.compile(
    rb'event: message\ndata: \{"config":\{"client_id":"(?P<id>[^"]+)","client_ttl_millis":60000\},'
    rb'"subscriptions":\[\]\}\n\n'
)


async def test_event_stream_opened_then_owned_by_the_hub() -> None:
    async with serving() as server:
        hub = server.streamer.hub
        proto, t = connect(server)
        proto.data_received(get("/events"))
        await settle()  # the head may be queued to the stream, flushed by the hub
        assert len(t.writes) == 1
        written = undated(t.writes[0])
        assert written.startswith(STREAM_HEAD)
        match = FIRST_FRAME.fullmatch(written[len(STREAM_HEAD) :])
        assert match is not None
        client = server.streamer.get_client(match["id"].decode())
        assert client is not None and len(client.streams) == 1
        assert hub.connection_count == 1
        assert proto not in server.http and server.connections == 1
        # The stream is the connection's protocol now: nothing is read from it.
        assert t.protocol is client.streams[0]
        t.protocol.data_received(HEALTHZ)
        await settle()
        assert len(t.writes) == 1 and not t.is_closing()
        t.lose()
        assert hub.connection_count == 0
        assert client.streams == () and server.connections == 0
