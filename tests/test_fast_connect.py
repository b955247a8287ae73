"""The connect fast path (protocol.py ``_connect_fast``, _fast/connect.pyx).

A connect it takes must be what httptools and the events route make of it,
and everything else must reach httptools byte for byte. So: the parser
against httptools and the slow path's query parse; then generated connects
(plain ones and near misses, some split across reads or followed by more
bytes) sent to real servers with the fast path on and off, whose answers
and new clients must be the same.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gochan import Config, Streamer
from gochan._fast import ConnectParser
from gochan.server import Server
from gochan.server.http import parse_query
from tests.support import DATE_HEADER, LoopInThread, httptools_reads, running, send_in_reads

LIMITS = {"max_url_bytes": 120, "max_header_bytes": 240, "max_headers": 7}
MAX_TOPICS = 4
PARSER_ARGS = ("/events", LIMITS["max_url_bytes"], LIMITS["max_header_bytes"],
               LIMITS["max_headers"], MAX_TOPICS)  # fmt: skip
# Headers the fast path declines: the events route or llhttp acts on them.
DECLINED = {
    "origin", "last-event-id", "authorization", "content-length", "transfer-encoding",
    "expect", "upgrade", "proxy-connection",
}  # fmt: skip

# -- generated connects --------------------------------------------------------

GOOD_TOPICS = ["t", "a", "T-1", "t?x", "a=b", "x" * 30, "new"]
ODD_TOPICS = ["", "message", "a%41", "a+b", "a%0Ab", "x" * 300, "é", "a#b"]
PLAIN_HEADERS = [
    ("Host", "127.0.0.1:3000"), ("Accept", "text/event-stream"), ("Cache-Control", "no-cache"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Sec-Fetch-Mode", "cors"),
    ("Accept-Language", "en-US,en;q=0.5"), ("Referer", "http://127.0.0.1:3000/"),
    ("Cookie", "a=1; b=2"), ("Connection", "keep-alive"), ("Pragma", "no-cache"),
    ("sec-ch-ua-mobile", "?0"), ("DNT", "1"),
]  # fmt: skip
ODD_HEADERS = [
    ("Origin", "http://allowed.example"), ("Origin", "http://evil.example"),
    ("Last-Event-ID", "x"), ("Authorization", "Bearer x"), ("Connection", "close"),
    ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Transfer-Encoding", "chunked"),
    ("Content-Length", "0"), ("Content-Length", "3"), ("Expect", "100-continue"),
    ("Proxy-Connection", "close"), ("X_Under", "1"), ("Empty", ""),
]  # fmt: skip
FAULTS = [
    "get", "HEAD", "POST", "/events/", "/Events", "http://h/events", "id", "last_event_id",
    "other field", "empty field", "no value", "HTTP/1.0", "LF", "separator", "fold", "NUL",
    "bare CR", "tab", "trailing space", "odd header", "odd topic", "many topics", "body",
]  # fmt: skip


@st.composite
def connects(draw: st.DrawFn) -> bytes:
    """One GET /events: half the time one the fast path should take, else
    with one thing off. (Choices from a seeded Random, as in
    test_fast_publish.py: hypothesis alone seldom drew a whole request.)"""
    rnd = draw(st.randoms(use_true_random=True))
    fault = rnd.choice(FAULTS + ["odd header"] * 4) if rnd.random() < 0.5 else None
    method = fault if fault in ("get", "HEAD", "POST") else "GET"
    path = fault if fault in ("/events/", "/Events", "http://h/events") else "/events"
    count = (
        rnd.randint(MAX_TOPICS + 1, MAX_TOPICS + 2)
        if fault == "many topics"
        else (rnd.randint(0, MAX_TOPICS))
    )
    fields = [f"topic={rnd.choice(GOOD_TOPICS)}" for _ in range(count)]
    if fault == "odd topic" or rnd.random() < 0.1:
        topic = rnd.choice(ODD_TOPICS) if rnd.random() < 0.8 else draw(st.text(max_size=4))
        fields.insert(rnd.randint(0, len(fields)), f"topic={topic}")
    extra = {
        "id": "id=abc", "last_event_id": "last_event_id=1", "other field": "_=123",
        "empty field": "", "no value": "topic",
    }.get(fault or "")  # fmt: skip
    if extra is not None:
        fields.insert(rnd.randint(0, len(fields)), extra)
    query = "?" + "&".join(fields) if fields or fault == "empty field" else ""
    version = "HTTP/1.0" if fault == "HTTP/1.0" else "HTTP/1.1"
    eol = "\n" if fault == "LF" else "\r\n"
    raw = bytearray(f"{method} {path}{query} {version}{eol}".encode())
    headers = rnd.sample(PLAIN_HEADERS, rnd.randint(0, 6))
    if fault == "odd header":
        headers.insert(rnd.randint(0, len(headers)), rnd.choice(ODD_HEADERS))
    if fault == "body":
        headers.append(("Content-Length", "2"))
    odd = rnd.randint(0, max(0, len(headers) - 1))  # the header a fault is on
    for i, (name, value) in enumerate(headers):
        name = rnd.choice([str, str, str.lower, str.upper])(name)
        sep = rnd.choice([": "] * 6 + [":", ":  ", ":\t"])
        if fault == "separator" and i == odd:
            sep = " : "
        if fault == "tab" and i == odd:
            value += "\tx"
        if fault == "trailing space" and i == odd:
            value += " "
        raw += f"{name}{sep}{value}".encode()
        if i == odd and fault in ("fold", "NUL", "bare CR"):
            raw += {"fold": b"\r\n folded", "NUL": b"\x00", "bare CR": b"\r"}[fault]
        raw += eol.encode()
    raw += eol.encode()
    if fault == "body":
        raw += b"ab"
    return bytes(raw)


@st.composite
def reads(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """A connect, sometimes followed by more bytes, and where to cut it into
    separate reads."""
    data = draw(connects())
    data += draw(st.sampled_from([b""] * 8 + [b"\r\n", b"GET /healthz HTTP/1.1\r\n\r\n"]))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=2))))
    return data, cuts if draw(st.integers(0, 3)) == 0 else []


# -- the parser against httptools ---------------------------------------------


@settings(max_examples=400, deadline=timedelta(seconds=2))
@given(data=connects())
def test_parser_takes_only_what_httptools_and_the_route_read_the_same(data: bytes) -> None:
    parser = ConnectParser(*PARSER_ARGS)
    got = parser.parse(data)
    for cut in range(1, len(data), max(1, len(data) // 7)):
        assert parser.parse(data[:cut]) is None  # only a whole request, the whole read
    assert parser.parse(data + b"GET") is None
    if got is None:
        return
    reading, http = httptools_reads(data)
    assert reading.complete and http.get_method() == b"GET" and not reading.body
    assert http.get_http_version() == "1.1" and http.should_keep_alive()
    url = httptools.parse_url(reading.url)
    assert url.path == b"/events" and url.fragment is None
    query = parse_query((url.query or b"").decode("latin-1"))
    assert query == ({"topic": got} if got else {})
    assert set(reading.headers).isdisjoint(DECLINED)
    assert reading.headers.get("connection", "keep-alive").lower() == "keep-alive"
    # Within the slow path's limits, counted as it counts them.
    assert len(reading.url) <= LIMITS["max_url_bytes"]
    assert reading.header_bytes <= LIMITS["max_header_bytes"]
    assert len(reading.headers) <= LIMITS["max_headers"]
    assert len(got) <= MAX_TOPICS


def test_parser_reads_a_browsers_connect_and_declines_near_misses() -> None:
    parser = ConnectParser("/events", 8192, 16384, 100, 1000)
    request = (
        b"GET /events?topic=a&topic=b%3F HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
        b"Accept: text/event-stream\r\nAccept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\nReferer: http://127.0.0.1:3000/\r\n"
        b"Connection: keep-alive\r\nSec-Fetch-Dest: empty\r\nSec-Fetch-Mode: cors\r\n"
        b"Sec-Fetch-Site: same-origin\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n\r\n"
    )
    assert parser.parse(request) is None  # b%3F needs unquoting: the slow path's
    plain = request.replace(b"b%3F", b"b?", 1)
    assert parser.parse(plain) == ["a", "b?"]
    assert parser.parse(b"GET /events HTTP/1.1\r\n\r\n") == []
    assert parser.parse(b"GET /events?topic=a&topic=a HTTP/1.1\r\n\r\n") == ["a", "a"]
    for old, new in [
        (b"GET", b"get"), (b"HTTP/1.1", b"HTTP/1.0"), (b"topic=a", b"id=x&topic=a"),
        (b"topic=a", b"topic=a&last_event_id=3"), (b"topic=a", b"topic="),
        (b"topic=a&", b"topic=a&&"), (b"/events", b"/events/"), (b"GET ", b"GET  "),
        (b"Pragma", b"Origin: http://127.0.0.1:3000\r\nPragma"), (b"Pragma", b"Last-Event-ID"),
        (b"Pragma", b"Authorization"), (b"keep-alive", b"close"), (b"Pragma", b"Upgrade"),
        (b"Pragma", b"Content-Length"), (b"Pragma", b"Transfer-Encoding"),
        (b"Pragma:", b"Pragma :"), (b"no-cache\r\n\r\n", b"no-cache \r\n\r\n"),
        (b"no-cache\r\n\r\n", b"no-cache\r\n \r\n"), (b"\r\nPragma", b"\nPragma"),
        (b"Pragma: no", b"Pragma: \x00no"), (b"topic=a", b"topic=a#f"),
    ]:  # fmt: skip
        assert parser.parse(plain.replace(old, new, 1)) is None, (old, new)


# -- real servers, fast path on and off ------------------------------------------


class Pair(LoopInThread):
    """Two servers of one config on a loop in a thread, one with the connect
    fast path and one without; ``taken`` counts the connects the fast one
    answered on it."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.streamers: list[Streamer] = []
        self.fast: Server = self.run(self._server({**options, "fast_connect": True}))
        self.slow: Server = self.run(self._server({**options, "fast_connect": False}))
        assert self.fast.connect_parser is not None and self.slow.connect_parser is None
        self.taken = 0
        answer = self.fast.router.events_fast

        def counted(*args: Any) -> Any:
            got = answer(*args)
            self.taken += got is not None
            return got

        self.fast.router.events_fast = counted  # type: ignore[method-assign]

    async def _server(self, options: dict[str, Any]) -> Server:
        streamer = Streamer(Config(port=0, header_timeout=5, **options))
        await streamer.start()
        self.streamers.append(streamer)
        return await streamer.serve("127.0.0.1", 0)

    def close(self) -> None:
        async def stop() -> None:
            for streamer in self.streamers:
                await streamer.close()

        self.run(stop())
        super().close()


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    servers = Pair(cors_origins=["http://allowed.example"], max_topics_per_client=MAX_TOPICS,
                   **LIMITS)  # fmt: skip
    try:
        yield servers
    finally:
        servers.close()


_CLIENT_ID = re.compile(rb'"client_id":"[A-Za-z0-9_-]+"')


def exchange(port: int, data: bytes, cuts: list[int]) -> bytes:
    """Send ``data`` in reads cut at ``cuts``; what comes back until the
    server closes or, for a stream, until its first frame is in (a stream
    stays open), with Date and the client id blanked."""
    sock = send_in_reads(port, data, cuts)
    got = bytearray()
    try:
        sock.settimeout(0.3)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
            head, _, frames = bytes(got).partition(b"\r\n\r\n")
            if b"text/event-stream" in head and frames.count(b"\n\n") >= 1:
                break  # the head, the retry line and the first frame
    finally:
        sock.close()
    return _CLIENT_ID.sub(b'"client_id":"ID"', DATE_HEADER.sub(b"\r\nDate: D\r\n", bytes(got)))


def differs(pair: Pair, data: bytes, cuts: list[int]) -> tuple[Any, ...] | None:
    """None when both servers answered the same and made as many clients."""
    outcomes = []
    for server in (pair.fast, pair.slow):
        before = server.streamer.count_clients()
        answer = exchange(server.port, data, cuts)
        outcomes.append((answer, server.streamer.count_clients() - before))
    return None if outcomes[0] == outcomes[1] else tuple(outcomes)


def test_fast_path_answers_as_the_slow_path(pair: Pair) -> None:
    @settings(
        max_examples=250,
        deadline=timedelta(seconds=5),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(case=reads())
    def check(case: tuple[bytes, list[int]]) -> None:
        data, cuts = case
        assert differs(pair, data, cuts) is None

    taken = pair.taken
    check()
    # The fast path really took connects (else this proved nothing).
    assert pair.taken - taken > 40, pair.taken - taken


def test_connects_the_route_refuses_are_refused_as_on_the_slow_path(pair: Pair) -> None:
    plain = b"GET /events?topic=t HTTP/1.1\r\nHost: 127.0.0.1:3000\r\n\r\n"
    cases = [
        (b"topic=t", b"topic=t", b"200 OK", 1),
        (b"topic=t", b"topic=message", b"400 Bad Request", 0),  # parsed fast, refused slow
        (b"topic=t", b"topic=" + b"x" * 110, b"431", 0),  # past max_url_bytes
        (b"topic=t", b"&".join([b"topic=t"] * (MAX_TOPICS + 1)), b"400 Bad Request", 0),
        (b"Host", b"Origin: http://allowed.example\r\nHost", b"200 OK", 0),
    ]
    for old, new, status, taken in cases:
        request = plain.replace(old, new, 1)
        before = pair.taken
        outcome = differs(pair, request, [])
        assert outcome is None, (request, outcome)
        assert pair.taken - before == taken, request
        assert exchange(pair.fast.port, request, []).startswith(b"HTTP/1.1 " + status), request
    cors = exchange(pair.fast.port, cases[-1][1].join(plain.split(cases[-1][0], 1)), [])
    assert b"Access-Control-Allow-Origin: http://allowed.example" in cors


async def test_a_stream_opened_on_the_fast_path_gets_what_is_published() -> None:
    async with running() as server:
        assert server.connect_parser is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /events?topic=news HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        first = await reader.readuntil(b"\n\n")
        assert b'"subscriptions":["news"]' in first
        assert await server.streamer.publish("news", b"hello") is not None
        frame = await reader.readuntil(b"\n\n")
        assert b"event: news\n" in frame and b"data: hello\n" in frame
        writer.close()


@pytest.mark.parametrize(
    "options",
    [
        {"fast_connect": False},
        {"access_log": True},
        {"jwt_key": "k" * 32},
        {"auto_create_clients": False},
    ],
)
async def test_the_fast_path_is_off_where_the_route_needs_the_request(
    options: dict[str, Any],
) -> None:
    async with running(**options) as server:
        assert server.connect_parser is None
    async with running() as server:
        assert server.connect_parser is not None
