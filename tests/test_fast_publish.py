"""The publish fast path (protocol.py ``_feed_fast``, _fast/publish.pyx).

What it accepts must mean exactly what httptools and the slow path make of
it, and everything else must reach httptools byte for byte. So: the compiled
parser against its pure twin and against httptools itself; then generated
requests (valid publishes and near misses, pipelined, split across reads)
sent to real servers with the fast path on and off, whose answer bytes and
published messages must be the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gochan import Config, Streamer
from gochan._fast import PUBLISH_DECLINED, PUBLISH_INCOMPLETE, core, pure
from gochan.server import Server
from gochan.server.protocol import HttpProtocol
from tests.support import (
    DATE_HEADER,
    LoopInThread,
    SSEStream,
    httptools_reads,
    running,
    send_in_reads,
)

PORT_IN_HOST = "3000"  # the same Host bytes go to every server (ports differ)
KEY = "sekrit-key"
LIMITS = {"max_body_bytes": 64, "max_url_bytes": 48, "max_header_bytes": 200, "max_headers": 6}
HELD_TOPICS = ("t", "a", "T-1", "t?x")

# -- generated requests ------------------------------------------------------

HOSTS = [
    f"127.0.0.1:{PORT_IN_HOST}", "localhost", "evil.example", "[::1]:80",
    "127.0.0.1.nip.io", "", " 127.0.0.1", "127.0.0.1 ", "127.0.0.1\t",
]  # fmt: skip
ORIGINS = ["same", "http://allowed.example", "http://evil.example", "null", ""]
AUTHS = [f"Bearer {KEY}", "Bearer nope", f"bearer  {KEY}", "Basic eA==", ""]
NAME_CASES: list[Callable[[str], str]] = [str, str, str.lower, str.upper]


FAULTS = [
    "post", "PUT", "GET", "/publish/", "/Publish", "http://h/publish", "?Topic=",
    "?x=1&topic=", "no query", "HTTP/1.0", "http/1.1", "version space", "two spaces",
    "LF", "separator", "fold", "NUL", "bare CR", "tab", "other header", "big body",
    "CL short", "CL long", "CL twice", "CL +", "CL 0", "CL space", "CL x", "no CL",
]  # fmt: skip
OTHER_HEADERS = [
    ("Content-Type", "text/plain"), ("Content-Type", "application/x-ndjson"),
    ("User-Agent", "loadgen/1"), ("Accept", "*/*"), ("Accept-Encoding", "gzip"),
    ("Connection", "keep-alive"), ("Connection", "Keep-Alive"),
]  # fmt: skip
ODD_HEADERS = [
    ("Connection", "close"), ("Transfer-Encoding", "chunked"), ("Expect", "100-continue"),
    ("X-Other", "1"), ("Upgrade", "websocket"), ("Host", "localhost"), ("Origin", "null"),
]  # fmt: skip


GOOD_HOSTS = [f"127.0.0.1:{PORT_IN_HOST}", "localhost", "[::1]:80", "127.0.0.1"]
GOOD_ORIGINS = [None, None, None, "same", "http://allowed.example"]
GOOD_TOPICS = [*HELD_TOPICS, "unheld", "a" * 40]
ODD_TOPICS = ["", "a&b", "a%41", "a+b", "a#f", "x y", "é", "message", "a%zz", "a" * 41]


@st.composite
def publish_requests(draw: st.DrawFn) -> bytes:
    """One request: half the time a fast-path publish the router accepts, else
    one with one thing off: a near miss of the parser's subset, or a Host,
    Origin, Authorization or topic the router refuses. (Choices come from a
    seeded Random: hypothesis alone kept drawing edge values, so few
    requests were whole and the fast path was seldom the one answering.)"""
    rnd = draw(st.randoms(use_true_random=True))
    fault = (
        rnd.choice(FAULTS + ["host", "origin", "auth"] + ["topic"] * 4)
        if rnd.random() < 0.5
        else None
    )
    method = fault if fault in ("post", "PUT", "GET") else "POST"
    target = fault if fault in ("/publish/", "/Publish", "http://h/publish") else "/publish"
    query = {"?Topic=": "?Topic=", "?x=1&topic=": "?x=1&topic=", "no query": ""}.get(
        fault or "", "?topic="
    )
    if fault == "topic" or rnd.random() < 0.15:
        topic = rnd.choice(ODD_TOPICS) if rnd.random() < 0.8 else draw(st.text(max_size=6))
    else:
        topic = rnd.choice(GOOD_TOPICS)
    version = {"HTTP/1.0": "HTTP/1.0", "http/1.1": "http/1.1", "version space": "HTTP/1.1 "}.get(
        fault or "", "HTTP/1.1"
    )
    gap = "  " if fault == "two spaces" else " "
    eol = "\n" if fault == "LF" else "\r\n"
    line = f"{method}{gap}{target}{query}{topic} {version}{eol}".encode()

    size = rnd.randint(60, 70) if fault == "big body" else rnd.randint(0, 12)
    body = rnd.randbytes(size)
    headers: list[tuple[str, str]] = []
    host = rnd.choice(HOSTS if fault == "host" else GOOD_HOSTS)
    if fault != "host" or rnd.random() < 0.8:
        headers.append(("Host", host))
    origin = rnd.choice(ORIGINS if fault == "origin" else GOOD_ORIGINS)
    if origin is not None:
        headers.append(("Origin", f"http://{host}" if origin == "same" else origin))
    auth = rnd.choice(AUTHS[1:]) if fault == "auth" else AUTHS[0]
    if fault != "auth" or rnd.random() < 0.8:
        headers.append(("Authorization", auth))
    others = rnd.sample(OTHER_HEADERS, rnd.randint(0, 2))
    headers += [h for i, h in enumerate(others) if h[0] not in [o[0] for o in others[:i]]]
    if fault == "other header":
        headers.insert(rnd.randint(0, len(headers)), rnd.choice(ODD_HEADERS))
    n = len(body)
    values = {
        "CL short": [str(max(0, n - 1))], "CL long": [str(n + 1)], "CL twice": [str(n)] * 2,
        "CL +": [f"+{n}"], "CL 0": [f"0{n}"], "CL space": [f"{n} "], "CL x": [f"{n}x"],
        "no CL": [],
    }.get(fault or "", [str(n)])  # fmt: skip
    for value in values:
        headers.insert(rnd.randint(0, len(headers)), ("Content-Length", value))
    odd = rnd.randint(0, max(0, len(headers) - 1))  # the header a fault is on
    raw = bytearray(line)
    for i, (name, value) in enumerate(headers):
        name = rnd.choice(NAME_CASES)(name)
        sep = rnd.choice([": "] * 6 + [":", ":  ", ":\t", ": \t "])  # all llhttp's OWS
        if fault == "separator" and i == odd:
            sep = " : "
        if fault == "tab" and i == odd:
            value += "\tx"
        raw += f"{name}{sep}{value}".encode()
        if i == odd and fault in ("fold", "NUL", "bare CR"):
            raw += {"fold": b"\r\n folded", "NUL": b"\x00", "bare CR": b"\r"}[fault]
        raw += eol.encode()
    raw += eol.encode()
    raw += body
    return bytes(raw)


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Requests back to back (sometimes garbage or a partial one last), and
    where to cut them into separate reads."""
    parts = draw(st.lists(publish_requests(), min_size=1, max_size=4))
    data = b"".join(parts)
    tail = draw(st.sampled_from([b""] * 6 + [b"\r\n", b"GARBAGE\r\n\r\n", parts[0][:20]]))
    data += tail
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=3))))
    return data, cuts


# -- the parser: compiled, pure, httptools --------------------------------


PARSER_ARGS = ("/publish", LIMITS["max_url_bytes"], LIMITS["max_header_bytes"],
               LIMITS["max_headers"], LIMITS["max_body_bytes"])  # fmt: skip


@settings(max_examples=300, deadline=timedelta(seconds=2))
@given(case=pipelines(), start=st.integers(0, 3))
def test_parser_matches_its_twin_and_httptools(case: tuple[bytes, list[int]], start: int) -> None:
    data, cuts = case
    compiled, twin = core.PublishParser(*PARSER_ARGS), pure.PublishParser(*PARSER_ARGS)
    ends = [*cuts, len(data)]  # every prefix a read could end at, too
    starts = [i for i in range(len(data)) if data.startswith(b"POST", i)] + [start]
    for end, pos in [(end, 0) for end in ends] + [(len(data), min(i, len(data))) for i in starts]:
        chunk = data[:end]
        got = compiled.parse(chunk, pos)
        assert got == twin.parse(chunk, pos)
        if type(got) is int:
            assert got in (PUBLISH_INCOMPLETE, PUBLISH_DECLINED)
            continue
        # Accepted: httptools reads exactly one whole request there, the same one.
        stop, topic, body, host, origin, authorization = got
        reading, parser = httptools_reads(chunk[pos:stop])
        assert reading.complete and parser.get_method() == b"POST"
        assert parser.get_http_version() == "1.1" and parser.should_keep_alive()
        url = httptools.parse_url(reading.url)
        assert url.path == b"/publish" and url.fragment is None
        assert url.query == b"topic=" + topic.encode("latin-1")
        assert not any(c in topic for c in "&%+") and topic
        assert body == reading.body
        assert host == reading.headers.get("host", "")
        assert origin == reading.headers.get("origin")
        assert authorization == reading.headers.get("authorization")
        assert "transfer-encoding" not in reading.headers and "expect" not in reading.headers
        # Within the slow path's limits, counted as it counts them.
        assert len(reading.url) <= LIMITS["max_url_bytes"]
        assert reading.header_bytes <= LIMITS["max_header_bytes"]
        assert len(reading.headers) <= LIMITS["max_headers"]
        assert int(reading.headers["content-length"]) <= LIMITS["max_body_bytes"]


def test_parser_waits_for_a_whole_request_and_declines_near_misses() -> None:
    parser = core.PublishParser("/publish", 4096, 16384, 100, 1 << 20)
    request = (
        b"POST /publish?topic=abc HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert parser.parse(request) == (len(request), "abc", b"hello", "127.0.0.1:3000", None, None)
    assert parser.parse(request * 2, len(request))[0] == 2 * len(request)  # type: ignore[index]
    for cut in range(len(request)):
        assert parser.parse(request[:cut]) == PUBLISH_INCOMPLETE, cut
    for old, new in [
        (b"POST", b"post"), (b"HTTP/1.1", b"HTTP/1.0"), (b"Length: 5", b"Length: +5"),
        (b"Length: 5", b"Length: 5 "), (b"text/plain\r\n", b"text/plain\r\n folded\r\n"),
        (b"Host:", b"Host :"), (b"Host: 1", b"Host: \x001"), (b"\r\nHost", b"\nHost"),
        (b"Content-Type", b"Transfer-Encoding"), (b"Content-Type: text/plain", b"Expect: x"),
        (b"Host: 127.0.0.1:3000", b"Content-Length: 5"), (b"topic=abc", b"topic=a%62c"),
        (b"topic=abc", b"topic=a&x=b"), (b"topic=abc", b"topic="), (b"POST ", b"POST  "),
        (b"Host: 127.0.0.1:3000", b"Host: 127.0.0.1:3000 "), (b"\r\n\r\n", b"\r\nOrigin:\r\n\r\n"),
    ]:  # fmt: skip
        assert parser.parse(request.replace(old, new, 1)) == PUBLISH_DECLINED, (old, new)


def test_the_compiled_parser_is_the_one_loaded() -> None:
    assert core.__file__ is not None
    assert core.__file__.endswith(sysconfig.get_config_var("EXT_SUFFIX"))
    assert type(core.PublishParser) is type and core.PublishParser is not pure.PublishParser
    assert not hasattr(core.PublishParser(*PARSER_ARGS), "__dict__")  # an extension type


# -- real servers, fast path on and off ------------------------------------


@dataclass
class Pair:
    """Two servers of one config, one with the fast path and one without."""

    fast: Server
    slow: Server
    published: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)
    fast_calls: list[bool] = field(default_factory=list)  # publish_fast: answered?


class Servers(LoopInThread):
    """Servers on a loop in a thread, so hypothesis can drive them from a
    plain test with blocking sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.streamers: list[Streamer] = []
        self.subscribers: list[tuple[asyncio.StreamWriter, asyncio.Task[None]]] = []

    async def _server(self, options: dict[str, Any]) -> Server:
        streamer = Streamer(Config(port=0, header_timeout=5, **options))
        await streamer.start()
        server = await streamer.serve("127.0.0.1", 0)
        self.streamers.append(streamer)
        # A stream holding a few topics, so publishes to them get ids.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        query = "&".join(f"topic={t.replace('?', '%3F')}" for t in HELD_TOPICS)
        writer.write(f"GET /events?{query} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())

        async def drain() -> None:
            while await reader.read(65536):
                pass

        self.subscribers.append((writer, asyncio.get_running_loop().create_task(drain())))
        await asyncio.sleep(0.05)
        return server

    def pair(self, **options: Any) -> Pair:
        async def make() -> Pair:
            fast = await self._server({**options, "fast_publish": True})
            slow = await self._server({**options, "fast_publish": False})
            pair = Pair(fast, slow)
            for server in (fast, slow):
                log = pair.published.setdefault(server.port, [])
                streamer = server.streamer
                publish = streamer.publish_nowait

                def recording(
                    topic: str, data: bytes, log: list[Any] = log, publish: Any = publish
                ) -> str | None:
                    event_id = publish(topic, data)  # what it refuses is not logged
                    log.append((topic, data))
                    return event_id

                streamer.publish_nowait = recording  # type: ignore[method-assign]
            answer = fast.router.publish_fast

            def counted(*args: Any) -> Any:
                got = answer(*args)
                pair.fast_calls.append(got is not None)
                return got

            fast.router.publish_fast = counted  # type: ignore[method-assign]
            assert fast.publish_parser is not None and slow.publish_parser is None
            return pair

        pair: Pair = self.run(make())
        return pair

    def close(self) -> None:
        async def stop() -> None:
            for writer, task in self.subscribers:
                task.cancel()
                writer.close()
            for streamer in self.streamers:
                await streamer.close()

        self.run(stop())
        super().close()


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Pair]]:
    running_servers = Servers()
    try:
        yield {
            # A keyless loopback server: Host and Origin are checked.
            "keyless": running_servers.pair(cors_origins=["http://allowed.example"], **LIMITS),
            # A server with a publish key: Authorization is.
            "key": running_servers.pair(publish_key=KEY, **LIMITS),
        }
    finally:
        running_servers.close()


_ID = re.compile(rb'"id":"[0-9a-f]{8}-')


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` in reads cut at ``cuts``, then the end of input; the
    answers, read until the server closes, with Date and the id epoch blanked."""
    sock = send_in_reads(port, data, cuts)
    got = bytearray()
    try:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    finally:
        sock.close()
    return _ID.sub(b'"id":"EPOCH-', DATE_HEADER.sub(b"\r\nDate: D\r\n", bytes(got)))


def differs(pair: Pair, data: bytes, cuts: list[int]) -> tuple[Any, ...] | None:
    """None when both servers answered and published the same."""
    outcomes = []
    for server in (pair.fast, pair.slow):
        log = pair.published[server.port]
        before, bad = len(log), server.metrics.bad_requests
        answer = exchange(server.port, data, cuts)
        outcomes.append((answer, log[before:], server.metrics.bad_requests - bad))
    return None if outcomes[0] == outcomes[1] else tuple(outcomes)


def test_fast_path_answers_and_publishes_as_the_slow_path(servers: dict[str, Pair]) -> None:
    @settings(
        max_examples=300,
        deadline=timedelta(seconds=5),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(case=pipelines(), which=st.sampled_from(["keyless", "key"]))
    def check(case: tuple[bytes, list[int]], which: str) -> None:
        data, cuts = case
        assert differs(servers[which], data, cuts) is None

    check()
    # The fast path really ran, answered and declined (else this proved nothing).
    calls = servers["keyless"].fast_calls + servers["key"].fast_calls
    assert calls.count(True) > 30 and calls.count(False) > 10, (calls.count(True), len(calls))


PUBLISH = (
    b"POST /publish?topic=t HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"
    b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
)


def test_refusals_read_on_the_fast_path_are_the_slow_paths(servers: dict[str, Pair]) -> None:
    keyless, key = servers["keyless"], servers["key"]
    cases = [
        (keyless, b"Host: 127.0.0.1:3000", b"Host: evil.example", b"403 Forbidden"),
        (keyless, b"Content-Type", b"Origin: http://evil.example\r\nContent-Type", b"403"),
        (keyless, b"Content-Type", b"Origin: http://allowed.example\r\nContent-Type", b"200"),
        (keyless, b"topic=t", b"topic=message", b"400 Bad Request"),
        (key, b"Content-Type", b"Authorization: Bearer nope\r\nContent-Type", b"401"),
        (key, b"Content-Type", b"Content-Type", b"401 Unauthorized"),
        (key, b"Content-Type", f"Authorization: Bearer {KEY}\r\nContent-Type".encode(), b"200"),
    ]
    for pair, old, new, status in cases:
        request = (PUBLISH % (5, b"hello")).replace(old, new, 1)
        calls = len(pair.fast_calls)
        outcome = differs(pair, request, [])
        assert outcome is None, (request, outcome)
        assert len(pair.fast_calls) == calls + 1, request  # it went through publish_fast
        answer = exchange(pair.fast.port, request, [])
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer)
    refused = exchange(key.fast.port, PUBLISH % (5, b"hello"), [])
    assert b'WWW-Authenticate: Bearer realm="gochan"' in refused
    allowed = exchange(
        keyless.fast.port,
        (PUBLISH % (5, b"hello")).replace(
            b"Content-Type", b"Origin: http://allowed.example\r\nContent-Type"
        ),
        [],
    )
    assert b"Access-Control-Allow-Origin: http://allowed.example" in allowed


# -- on one server: pipelining, splits, writes --------------------------------


class Counting:
    """Counts httptools' on_message_begin calls (slow-path requests)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.begun = 0
        begin = HttpProtocol.on_message_begin

        def counted(proto: HttpProtocol) -> None:
            self.begun += 1
            begin(proto)

        monkeypatch.setattr(HttpProtocol, "on_message_begin", counted)


async def read_answers(reader: asyncio.StreamReader, n: int) -> bytes:
    data = b""
    while data.count(b"HTTP/1.1 ") < n or not data.endswith(b"}"):
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data


async def test_pipelined_publishes_split_at_every_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    async with running() as server:
        assert isinstance(server.publish_parser, core.PublishParser)
        stream = await SSEStream.open(server.port, "/events?topic=t")
        await stream.config()
        begun = counting.begun
        bodies = [b"one", b"two-2", b"three-33"]
        payload = b"".join(PUBLISH % (len(b), b) for b in bodies)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for cut in range(1, len(payload)):
            writer.write(payload[:cut])
            await writer.drain()
            await asyncio.sleep(0.001)  # the rest comes in a read of its own
            writer.write(payload[cut:])
            answers = await read_answers(reader, 3)
            assert answers.count(b"HTTP/1.1 200 OK\r\n") == 3, (cut, answers)
            assert answers.count(b'{"id":"') == 3
            for body in bodies:
                assert (await stream.event())["data"] == body.decode()
        writer.close()
        await stream.close()
        # No request was read by httptools: all of them took the fast path.
        assert counting.begun == begun, counting.begun - begun


async def test_pipelined_publishes_of_one_read_are_answered_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[int] = []
    async with running() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(PUBLISH % (1, b"x"))
        await read_answers(reader, 1)
        (proto,) = list(server.http)
        transport = proto.transport
        assert transport is not None
        write = transport.write

        class Spy:
            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

            def write(self, data: bytes) -> None:
                writes.append(data.count(b"HTTP/1.1 200 OK"))
                write(data)

        proto.transport = Spy()  # type: ignore[assignment]
        writer.write(b"".join(PUBLISH % (2, b"%02d" % i) for i in range(50)))
        answers = await read_answers(reader, 50)
        assert answers.count(b"HTTP/1.1 200 OK") == 50
        assert writes == [50]
        writer.close()


async def test_a_slow_request_in_between_keeps_the_order() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=t")
        await stream.config()
        slow = (  # X-Other is not in the fast path's subset
            b"POST /publish?topic=t HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Other: 1\r\n"
            b"Content-Length: 4\r\n\r\nslow"
        )
        health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        payload = PUBLISH % (3, b"one") + slow + health + PUBLISH % (3, b"two")
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(payload)
        data = await read_answers(reader, 4)
        statuses = re.findall(rb"HTTP/1.1 (\d+)", data)
        assert statuses == [b"200"] * 4
        assert data.index(b"ok\n") < data.rindex(b'{"id"')
        for body in ("one", "slow", "two"):
            assert (await stream.event())["data"] == body
        writer.close()
        await stream.close()


async def test_a_request_the_fast_path_keeps_times_out_as_the_slow_path() -> None:
    async with running(header_timeout=0.3) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write((PUBLISH % (5, b"hello"))[:-2])
        answer = await asyncio.wait_for(reader.read(65536), 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        writer.close()


@pytest.mark.parametrize(
    "options",
    [
        {"fast_publish": False},
        {"access_log": True},
        {"jwt_key": "k" * 32},
        {"publish_path": "/p#x"},
    ],
    ids=["switched-off", "access-log", "authorization", "path-with-a-fragment"],
)
async def test_fast_path_off(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    async with running(**options) as server:
        assert server.publish_parser is None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(PUBLISH % (5, b"hello"))
        await asyncio.wait_for(reader.read(65536), 5)
        assert counting.begun == 1  # httptools read it
        writer.close()


async def test_another_publish_path_is_fast_too(monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    async with running(publish_path="/api/v1/pub") as server:
        assert server.publish_parser is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = (PUBLISH % (5, b"hello")).replace(b"/publish", b"/api/v1/pub")
        writer.write(request + PUBLISH % (5, b"hello"))  # the second: 404, from httptools
        answers = b""
        while not answers.endswith(b"not found\n"):
            answers += await asyncio.wait_for(reader.read(65536), 5)
        assert re.findall(rb"HTTP/1.1 (\d+)", answers) == [b"200", b"404"]
        assert counting.begun == 1
        writer.close()
