"""SSE clients nobody here wrote read gochan's frames correctly.

Each client connects to a gochan started with ``retry_ms=1500`` and
``heartbeat=0.2`` and receives the same awkward messages (multi-line bodies
split on CRLF, LF and CR, blank and trailing lines, a leading space, field-like
lines, unicode, a long line, an empty body), with heartbeats in between, then
the ``Client closed`` frame. Checked per client: event type (the topic), data
(lines joined with \\n, as the SSE spec says), last event id, and the retry
value where the client exposes it (or by how long it waits to reconnect).

Clients: the Node ``eventsource`` package (tests/interop, ``npm ci`` there),
httpx-sse, aiohttp-sse-client2, and curl. A missing one skips, except when
``GOCHAN_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import pytest

from gochan.server import Server
from tests.support import running

INTEROP = Path(__file__).resolve().parent / "interop"
NODE_CLIENT = INTEROP / "eventsource_client.mjs"

RETRY_MS = 1500
HEARTBEAT_S = 0.2
TOPIC = "interop"
OTHER = "other topic ☃"  # a space and non-ASCII: escaped in the URL, raw in "event:"

# (topic, body) and the data a spec-conforming client must give.
MESSAGES: list[tuple[str, bytes, str]] = [
    (TOPIC, b"plain", "plain"),
    (TOPIC, b"crlf\r\nline", "crlf\nline"),
    (TOPIC, b"lf\nline", "lf\nline"),
    (TOPIC, b"cr\rline", "cr\nline"),
    (TOPIC, b"mixed\r\n\r\rend", "mixed\n\n\nend"),
    (OTHER, "unicode é ☃ 🎉".encode(), "unicode é ☃ 🎉"),
    (TOPIC, b"", ""),
    (TOPIC, b" leading space", " leading space"),
    (TOPIC, b"blank\n\nline", "blank\n\nline"),
    (TOPIC, b"trailing\n", "trailing\n"),
    (TOPIC, b"id: 7\nevent: x\nretry: 1\n: no comment", "id: 7\nevent: x\nretry: 1\n: no comment"),
    (OTHER, b"x" * 16384, "x" * 16384),
]
HALF = len(MESSAGES) // 2
# Idle time between the halves: heartbeats are swept on the server's tick
# (0.5 s), so at least one goes by.
HEARTBEAT_PAUSE_S = 1.1


def client_unavailable(reason: str) -> NoReturn:
    if os.environ.get("GOCHAN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"SSE client required (GOCHAN_REQUIRE_BROWSER=1) but unavailable: {reason}")
    pytest.skip(reason)


def events_url(server: Server) -> str:
    query = urlencode([("topic", TOPIC), ("topic", OTHER)], quote_via=quote)
    return f"http://127.0.0.1:{server.port}/events?{query}"


@contextlib.asynccontextmanager
async def gochan() -> AsyncIterator[Server]:
    async with running(retry_ms=RETRY_MS, heartbeat=HEARTBEAT_S) as server:
        yield server


async def publish_all(server: Server) -> list[str]:
    """Publish MESSAGES, with several heartbeats between the two halves."""
    ids = []
    for i, (topic, body, _) in enumerate(MESSAGES):
        if i == HALF:
            await asyncio.sleep(HEARTBEAT_PAUSE_S)
        event_id = await server.streamer.publish(topic, body)
        assert event_id
        ids.append(event_id)
    return ids


def expected(ids: list[str], transform: Callable[[str], str] = str) -> list[dict[str, str]]:
    return [
        {"type": topic, "data": transform(data), "id": event_id}
        for (topic, _, data), event_id in zip(MESSAGES, ids, strict=True)
    ]


def check_config(data: str) -> str:
    """The first frame; returns the client id."""
    first = json.loads(data)
    assert sorted(first["subscriptions"]) == sorted([TOPIC, OTHER])
    client_id: str = first["config"]["client_id"]
    return client_id


# -- Node.js: the `eventsource` package ---------------------------------------


async def test_node_eventsource() -> None:
    node = shutil.which("node")
    if node is None:
        client_unavailable("node is not installed")
    if not (INTEROP / "node_modules" / "eventsource").is_dir():
        client_unavailable("the eventsource npm package is missing: npm ci --prefix tests/interop")
    async with gochan() as server:
        await server.streamer.new_client([TOPIC])
        proc = await asyncio.create_subprocess_exec(
            node, str(NODE_CLIENT), events_url(server), TOPIC, OTHER,
            cwd=INTEROP, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None

        async def observe() -> dict[str, Any]:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)  # type: ignore[union-attr]
            assert line, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
            seen: dict[str, Any] = json.loads(line)
            return seen

        try:
            assert await observe() == {"kind": "open"}
            first = await observe()
            assert first["type"] == "message" and first["lastEventId"] == ""
            client_id = check_config(first["data"])
            ids = await publish_all(server)
            got = [await observe() for _ in MESSAGES]
            frames = [{"type": g["type"], "data": g["data"], "id": g["lastEventId"]} for g in got]
            assert frames == expected(ids)
            assert await server.streamer.remove_client(client_id)
            closed = await observe()
            assert (closed["type"], closed["data"]) == ("message", "Client closed")
            assert await observe() == {"kind": "error", "readyState": 0}  # reconnecting
            # Published while it waits to reconnect (another client holds the topic).
            missed = await server.streamer.publish(TOPIC, b"while away")
            # It waits the server's retry (1500 ms), not its default (3000 ms).
            reopened = await observe()
            assert reopened["kind"] == "reopened"
            assert RETRY_MS - 100 <= reopened["delayMs"] < RETRY_MS + 1000, reopened
            # It resent the last id (Last-Event-ID): the new stream resumes there.
            check_config((await observe())["data"])
            replay = json.loads((await observe())["data"])
            assert replay == {"replay": {"last_event_id": ids[-1], "recovered": True}}
            again = await observe()
            assert (again["type"], again["data"], again["lastEventId"]) == (
                TOPIC,
                "while away",
                missed,
            )
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


# -- Python: httpx-sse --------------------------------------------------------


async def test_httpx_sse() -> None:
    try:
        import httpx
        from httpx_sse import ServerSentEvent, aconnect_sse
    except ImportError:
        client_unavailable("httpx-sse is not installed (pip install httpx-sse)")
    async with (
        gochan() as server,
        httpx.AsyncClient(timeout=10) as http,
        aconnect_sse(http, "GET", events_url(server)) as source,
    ):
        assert source.response.headers["content-type"] == "text/event-stream"
        events = source.aiter_sse()
        first = await anext(events)
        assert first.event == "message" and first.id == ""
        assert first.retry == RETRY_MS  # the field before the first frame
        client_id = check_config(first.data)

        async def next_event() -> ServerSentEvent:
            while True:
                event = await anext(events)
                # httpx-sse <= 0.4.3 turns a comment frame (a heartbeat) seen
                # after any id into an empty "message" event (httpx-sse issue
                # #35, PR #46). gochan never sends that: a system frame has data.
                if not (event.event == "message" and event.data == ""):
                    return event

        ids = await publish_all(server)
        got = [await next_event() for _ in MESSAGES]
        assert [{"type": e.event, "data": e.data, "id": e.id} for e in got] == expected(ids)
        assert all(e.retry is None for e in got)
        await server.streamer.remove_client(client_id)
        closed = await next_event()
        assert (closed.event, closed.data) == ("message", "Client closed")
        assert closed.id == ids[-1]  # a frame without id keeps the last one
        with pytest.raises(StopAsyncIteration):
            await anext(events)  # and the stream ends


# -- Python: aiohttp-sse-client2 ----------------------------------------------


def aiohttp_sse_client2_data(data: str) -> str:
    """What aiohttp-sse-client2 gives for ``data``: it strips every leading
    space of a field value (the spec: one) and every trailing LF of the data
    (the spec: one). Its deviations, not gochan's: the frames are the same
    bytes the other clients read to the letter."""
    return "\n".join(line.lstrip(" ") for line in data.split("\n")).rstrip("\n")


async def test_aiohttp_sse_client2() -> None:
    try:
        from aiohttp_sse_client2 import client as sse_client
    except ImportError:
        client_unavailable("aiohttp-sse-client2 is not installed (pip install aiohttp-sse-client2)")
    async with gochan() as server:
        source = sse_client.EventSource(events_url(server))
        async with source:
            first = await source.__anext__()
            assert first.type == "message" and first.last_event_id == ""
            # It keeps the retry field as its reconnection time.
            assert source._reconnection_time == datetime.timedelta(milliseconds=RETRY_MS)
            client_id = check_config(first.data)
            ids = await publish_all(server)
            got = [await source.__anext__() for _ in MESSAGES]
            assert [{"type": e.type, "data": e.data, "id": e.last_event_id} for e in got] == (
                expected(ids, aiohttp_sse_client2_data)
            )
            await server.streamer.remove_client(client_id)
            closed = await source.__anext__()
            assert (closed.type, closed.data) == ("message", "Client closed")
            assert closed.last_event_id == ids[-1]


# -- curl ---------------------------------------------------------------------


def parse_sse(stream: bytes) -> tuple[list[dict[str, str]], list[str], int | None]:
    """The WHATWG event stream interpretation of a whole stream: the events
    (type, data, last event id), the comments, and the last retry value."""
    text = stream.decode("utf-8")
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines.pop()  # after the last line break: an incomplete line, discarded
    events: list[dict[str, str]] = []
    comments: list[str] = []
    retry: int | None = None
    event_type, data, last_id = "", "", ""
    for line in lines:
        if line == "":
            if data:
                events.append({"type": event_type or "message", "data": data[:-1], "id": last_id})
            event_type, data = "", ""
            continue
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event_type = value
        elif name == "data":
            data += value + "\n"
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            retry = int(value)
    return events, comments, retry


async def test_curl() -> None:
    curl = shutil.which("curl")
    if curl is None:
        client_unavailable("curl is not installed")
    async with gochan() as server:
        proc = await asyncio.create_subprocess_exec(
            curl, "-sSN", "--max-time", "20", "-H", "Accept: text/event-stream",
            events_url(server), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            received = b""
            while b"\n\n" not in received:
                received += await asyncio.wait_for(proc.stdout.read(65536), 10)
            client_id = check_config(parse_sse(received)[0][0]["data"])
            ids = await publish_all(server)
            await asyncio.sleep(0.2)
            await server.streamer.remove_client(client_id)
            rest, stderr = await asyncio.wait_for(proc.communicate(), 10)
            assert proc.returncode == 0, stderr  # the server ended the stream cleanly
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    stream = received + rest
    assert stream.startswith(b"retry: %d\nevent: message\n" % RETRY_MS)
    events, comments, retry = parse_sse(stream)
    assert retry == RETRY_MS
    assert events[0]["type"] == "message"
    assert events[1:-1] == expected(ids)
    assert events[-1] == {"type": "message", "data": "Client closed", "id": ids[-1]}
    # Heartbeats: bare ":" comment lines, each a frame of its own.
    assert len(comments) >= 1 and set(comments) == {""}, comments
    # (two heartbeats in a row share a newline: count them overlapping)
    assert len(re.findall(rb"(?<=\n):\n\n", stream)) == len(comments)
