"""The publish fast path of HttpProtocol driven by hand (fake transport and
clock, see test_http_protocol.py): flow control, the kept start of a request
and its deadline, the hand-over to httptools."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gochan import Config, Streamer
from gochan.server import Server
from gochan.server import protocol as protocol_module
from gochan.server.protocol import HOLD_MAX_READS, IN_REQUEST, HttpProtocol

from .fakes import FakeClock, FakeTransport, undated

KEY = "k3y"
HEADER_TIMEOUT_S = 10.0
KEEPALIVE_S = 75.0


def publish(body: bytes, topic: bytes = b"t") -> bytes:
    return (
        b"POST /publish?topic=%s HTTP/1.1\r\nHost: gochan\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (topic, KEY.encode(), len(body), body)
    )


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(protocol_module, "time", fake)
    return fake


@pytest.fixture
def begun(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many requests httptools began (on_message_begin calls)."""
    count = [0]
    original = HttpProtocol.on_message_begin

    def counted(proto: HttpProtocol) -> None:
        count[0] += 1
        original(proto)

    monkeypatch.setattr(HttpProtocol, "on_message_begin", counted)
    return count


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Server]:
    config = Config(publish_key=KEY, **options)
    streamer = Streamer(config)
    await streamer.start()
    server = Server(streamer, config, sweep=False)
    try:
        yield server
    finally:
        await streamer.close()


def connect(server: Server) -> tuple[HttpProtocol, FakeTransport]:
    proto = server.protocol_factory()
    return proto, FakeTransport().connect(proto)


def statuses(wire: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1.1 (\d+)", wire)


async def test_a_peer_not_reading_stops_the_fast_path_and_the_rest_waits(
    begun: list[int],
) -> None:
    async with serving(write_buffer_high_bytes=1024) as server:
        proto, t = connect(server)
        t.peer_reads = False
        data = b"".join(publish(b"%03d" % i) for i in range(200))
        proto.data_received(data)
        assert len(t.writes) == 1 and t.writing_paused and not t.reading
        done = statuses(t.wire).count(b"200")
        assert 0 < done < 200 and data.endswith(proto._unparsed)
        assert len(proto._unparsed) == len(data) - sum(len(publish(b"000")) for _ in range(done))
        t.drain()  # the rest is read on, on the fast path again
        assert statuses(t.wire) == [b"200"] * 200 and t.reading
        assert begun[0] == 0


async def test_a_kept_start_is_answered_with_the_next_read(
    clock: FakeClock, begun: list[int]
) -> None:
    async with serving() as server:
        proto, t = connect(server)
        request = publish(b"hello")
        proto.data_received(request + request[:30])
        assert statuses(t.wire) == [b"200"] and proto._held == (request[:30], 1)
        assert proto.state & IN_REQUEST
        assert proto.deadline == clock.now + HEADER_TIMEOUT_S
        clock.now += 1
        proto.data_received(request[30:])
        assert statuses(t.wire) == [b"200", b"200"] and proto._held == ()
        assert not proto.state & IN_REQUEST
        assert proto.deadline == clock.now + KEEPALIVE_S
        assert begun[0] == 0


async def test_a_kept_start_times_out_from_its_first_byte(clock: FakeClock) -> None:
    async with serving() as server:
        proto, t = connect(server)
        start = clock.now
        proto.data_received(publish(b"hello")[:10])
        clock.now += 5
        proto.data_received(publish(b"hello")[10:20])
        assert proto.deadline == start + HEADER_TIMEOUT_S
        clock.now = start + HEADER_TIMEOUT_S
        server._tick(clock.now)
        assert undated(t.wire).startswith(b"HTTP/1.1 408 Request Timeout\r\n") and t.closed


async def test_a_start_kept_too_long_goes_to_httptools_with_its_deadline(
    clock: FakeClock, begun: list[int]
) -> None:
    async with serving() as server:
        proto, t = connect(server)
        request = publish(b"hello")
        start = clock.now + 0.5  # when the first byte comes
        for i in range(HOLD_MAX_READS + 1):  # one byte per read
            clock.now += 0.5
            proto.data_received(request[i : i + 1])
        assert proto._held == () and begun[0] == 1  # httptools has it now
        assert proto.deadline == start + HEADER_TIMEOUT_S  # timed from its first byte
        proto.data_received(request[HOLD_MAX_READS + 1 :])
        assert statuses(t.wire) == [b"200"]
        proto.data_received(request)  # idle again: the fast path reads this one
        assert statuses(t.wire) == [b"200", b"200"] and begun[0] == 1


async def test_a_request_the_fast_path_declines_is_read_with_what_follows(
    begun: list[int],
) -> None:
    async with serving() as server:
        proto, t = connect(server)
        odd = publish(b"odd").replace(b"Host: gochan", b"Host: gochan\r\nX-Trace: 1")
        proto.data_received(publish(b"a") + odd + publish(b"b"))
        # One write: the fast path's answer, then httptools' two.
        assert len(t.writes) == 1 and statuses(t.wire) == [b"200"] * 3
        assert begun[0] == 2
        assert server.streamer.counters["published"] == 3


async def test_a_publish_read_while_a_handler_waits_does_not_overtake_it(
    begun: list[int],
) -> None:
    async with serving() as server:
        client = server.streamer.create_client()
        body = b'{"client_id":"%s"}' % client.id.encode()
        update = (
            b"POST /update_subscriptions HTTP/1.1\r\nHost: gochan\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body)
        )
        proto, t = connect(server)
        proto.data_received(update)
        assert proto.busy and t.writes == []  # the update waits on the broker
        proto.data_received(publish(b"after"))  # its own read, while the update waits
        assert t.writes == [] and begun[0] == 2  # queued behind it, read by httptools
        task = proto.task
        assert task is not None
        await task
        wire = undated(t.wire)
        assert statuses(wire) == [b"200", b"200"]
        assert wire.index(b'"subscriptions"') < wire.index(b'{"id":')
        proto.data_received(publish(b"idle"))  # idle again: the fast path reads it
        assert statuses(t.wire) == [b"200"] * 3 and begun[0] == 2
