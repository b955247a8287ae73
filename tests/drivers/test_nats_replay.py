"""Replay that loses nothing with NATS JetStream: a browser resumes from its
Last-Event-ID on another gochan process, and on a restarted one."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from gochan.server import Server

from . import e2e
from ._nats_server import NatsServer


@pytest.fixture
def server() -> Iterator[NatsServer]:
    yield from NatsServer.running()


def options(server: NatsServer, stream: str) -> dict[str, Any]:
    return {"url": server.url, "jetstream": True, "prefix": "gochan.", "stream": stream}


def node(server: NatsServer, stream: str) -> contextlib.AbstractAsyncContextManager[Server]:
    return e2e.serving("nats", options(server, stream))


open_stream = e2e.open_replay_stream
replay_answer = e2e.replay_answer


async def js_publish(server: NatsServer, stream: str, subject: str, data: bytes) -> str:
    nc = await nats.connect(server.url)
    try:
        ack = await nc.jetstream().publish(subject, data, stream=stream)
        return str(ack.seq)
    finally:
        await nc.close()


async def test_resume_on_another_process_and_after_a_restart(server: NatsServer) -> None:
    name = "R" + secrets.token_hex(4).upper()
    broker = e2e.Broker("nats", options(server, name), publish=_unused)
    async with node(server, name) as a, e2e.process_node(broker) as b:
        first = await open_stream(a.port)
        await a.streamer.publish("t1", b"m0")
        seen = await first.event()
        assert seen["data"] == "m0"
        await first.close()
        missed = [  # published through the other gochan process, and by any NATS client
            ("t1", (await e2e.post_publish(b.port, "t1", b"m1")).json()["id"]),
            ("t2", await js_publish(server, name, "gochan.t2", b"m2")),
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
    # Both processes are gone; a new one on the same stream takes over.
    after_restart = await js_publish(server, name, "gochan.t1", b"while down")
    async with e2e.process_node(broker) as c:
        resumed = await open_stream(c.port, str(last))
        assert (await replay_answer(resumed))["recovered"] is True
        event = await resumed.event()
        assert (event["id"], event["data"]) == (after_restart, "while down")
        await resumed.close()


async def _unused(topic: str, data: bytes) -> None:
    raise AssertionError("not used here")


async def test_racing_publishes_across_reconnects(server: NatsServer) -> None:
    name = "R" + secrets.token_hex(4).upper()
    async with node(server, name) as a, node(server, name) as b:
        published: list[str] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                published.append(await js_publish(server, name, f"gochan.t{1 + i % 2}", b"%d" % i))
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
        await stream.close()


async def test_unknown_or_future_ids_are_not_recovered(server: NatsServer) -> None:
    name = "R" + secrets.token_hex(4).upper()
    async with node(server, name) as a:
        await a.streamer.publish("t1", b"x")
        for last_id in ("999999", "not-a-sequence"):
            stream = await open_stream(a.port, last_id)
            assert await replay_answer(stream) == {"last_event_id": last_id, "recovered": False}
            live = await a.streamer.publish("t1", b"live")
            assert (await stream.event())["id"] == live  # live delivery still starts
            await stream.close()
