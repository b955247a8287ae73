"""Replay that loses nothing with Redis Streams: a browser resumes from its
Last-Event-ID on the same gochan process, on another one (a second
``python -m gochan.server --driver redis --redis-streams``), and on a
restarted one; an id the stream no longer keeps is not claimed."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from gochan.server import Server

from . import e2e
from ._redis_server import RedisServer
from .conftest import import_or_skip

redis_asyncio = import_or_skip("redis.asyncio")
redis_streams = import_or_skip("gochan.drivers.redis_streams")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from RedisServer.running()


def options(server: RedisServer, prefix: str, **more: Any) -> dict[str, Any]:
    return {"url": server.url, "streams": True, "prefix": prefix, **more}


def stream_name(prefix: str) -> str:
    return prefix + redis_streams.DEFAULT_STREAM_NAME


def node(
    server: RedisServer, prefix: str, **more: Any
) -> contextlib.AbstractAsyncContextManager[Server]:
    return e2e.serving("redis", options(server, prefix, **more))


open_stream = e2e.open_replay_stream
replay_answer = e2e.replay_answer


async def xadd(server: RedisServer, prefix: str, topic: str, data: bytes) -> str:
    """Publish as any other Redis client would: XADD with the topic as a field."""
    client = redis_asyncio.Redis.from_url(server.url)
    try:
        entry = await client.xadd(stream_name(prefix), {"topic": topic, "data": data})
        return str(entry.decode())
    finally:
        await client.aclose()


async def _unused(topic: str, data: bytes) -> None:
    raise AssertionError("not used here")


async def test_resume_on_the_same_process(server: RedisServer) -> None:
    prefix = "r" + secrets.token_hex(4) + ":"
    async with node(server, prefix) as a:
        first = await open_stream(a.port)
        await a.streamer.publish("t1", b"m0")
        seen = await first.event()
        await first.close()
        missed = [
            ("t2", await a.streamer.publish("t2", b"m1")),
            ("t1", await xadd(server, prefix, "t1", b"m2")),
        ]
        await a.streamer.publish("elsewhere", b"not for us")
        resumed = await open_stream(a.port, seen["id"])
        assert await replay_answer(resumed) == {"last_event_id": seen["id"], "recovered": True}
        got = [await resumed.event() for _ in missed]
        assert [(e["event"], e["id"]) for e in got] == missed
        assert [e["data"] for e in got] == ["m1", "m2"]
        live = await a.streamer.publish("t1", b"live")
        assert (await resumed.event())["id"] == live
        await resumed.no_frame(0.3)
        await resumed.close()


async def test_resume_on_another_process_and_after_a_restart(server: RedisServer) -> None:
    prefix = "r" + secrets.token_hex(4) + ":"
    broker = e2e.Broker("redis", options(server, prefix), publish=_unused)
    async with node(server, prefix) as a, e2e.process_node(broker) as b:
        first = await open_stream(a.port)
        await a.streamer.publish("t1", b"m0")
        seen = await first.event()
        assert seen["data"] == "m0"
        await first.close()
        missed = [  # published through the other gochan process, and by any Redis client
            ("t1", (await e2e.post_publish(b.port, "t1", b"m1")).json()["id"]),
            ("t2", await xadd(server, prefix, "t2", b"m2")),
            ("t1", (await e2e.post_publish(b.port, "t1", b"m3\nline")).json()["id"]),
        ]
        await e2e.post_publish(b.port, "elsewhere", b"not for us")
        resumed = await open_stream(b.port, seen["id"])
        assert await replay_answer(resumed) == {"last_event_id": seen["id"], "recovered": True}
        got = [await resumed.event() for _ in missed]
        assert [(e["event"], e["id"]) for e in got] == missed
        assert [e["data"] for e in got] == ["m1", "m2", "m3\nline"]
        live = await a.streamer.publish("t2", b"live")
        assert (await resumed.event())["id"] == live
        await resumed.no_frame(0.3)
        last = live
        await resumed.close()
    # Both processes are gone; a new one on the same Redis takes over.
    after_restart = await xadd(server, prefix, "t1", b"while down")
    async with e2e.process_node(broker) as c:
        resumed = await open_stream(c.port, str(last))
        assert (await replay_answer(resumed))["recovered"] is True
        event = await resumed.event()
        assert (event["id"], event["data"]) == (after_restart, "while down")
        live = (await e2e.post_publish(c.port, "t2", b"live again")).json()["id"]
        assert (await resumed.event())["id"] == live
        await resumed.close()


async def test_racing_publishes_across_reconnects(server: RedisServer) -> None:
    prefix = "r" + secrets.token_hex(4) + ":"
    async with node(server, prefix) as a, node(server, prefix) as b:
        published: list[str] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                published.append(await xadd(server, prefix, f"t{1 + i % 2}", b"%d" % i))
                i += 1

        stream = await open_stream(a.port)
        task = asyncio.create_task(publisher())
        received: list[str] = []
        for hop in range(6):
            while len(received) < 5 * (hop + 1):
                event = await stream.event()
                if event["event"] != "message":
                    received.append(event["id"])
            await stream.close()
            stream = await open_stream((b if hop % 2 == 0 else a).port, received[-1])
            assert (await replay_answer(stream))["recovered"] is True
        stop.set()
        await task
        while len(received) < len(published):
            received.append((await stream.event(timeout=10))["id"])
        assert received == published  # each once, in stream order, across 6 hand-offs
        await stream.no_frame(0.3)
        await stream.close()


async def test_trimmed_unknown_or_future_ids_are_not_recovered(server: RedisServer) -> None:
    prefix = "r" + secrets.token_hex(4) + ":"
    async with node(server, prefix, stream_maxlen=5) as a:
        trimmed = await a.streamer.publish("t1", b"soon trimmed")
        for i in range(300):
            await a.streamer.publish("t1", b"%d" % i)
        client = redis_asyncio.Redis.from_url(server.url)
        try:
            assert await client.xrange(stream_name(prefix), trimmed, trimmed) == []
            newest = (await client.xrevrange(stream_name(prefix), count=1))[0][0].decode()
        finally:
            await client.aclose()
        ms = newest.partition("-")[0]
        future = f"{int(ms) + 60_000}-0"
        for last_id in (trimmed, "1-0", future, "not-an-entry-id"):
            stream = await open_stream(a.port, last_id)
            assert await replay_answer(stream) == {"last_event_id": last_id, "recovered": False}
            live = await a.streamer.publish("t1", b"live")
            assert (await stream.event())["id"] == live  # live delivery still starts
            await stream.close()
