"""Batch publish through the brokers' own batching, end to end over gochan's
HTTP: real nats-server (core NATS and JetStream) and redis-server (pub/sub
and Streams) processes owned by the tests. Every message of an acknowledged
batch arrives, in order on each topic; a batch the broker refuses is a 503 that says what
was published."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.js import api

from tests.support import SSEStream

from . import e2e
from ._nats_server import NatsServer
from ._redis_server import RedisServer

NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    for server in NatsServer.running():
        server.set_config("max_payload: 4096\n")  # a limit a test can pass
        server.restart()
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from RedisServer.running()


async def post(port: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(f"http://127.0.0.1:{port}/publish", content=body, headers=headers)


def batch(topics: list[str], count: int, size: int = 0) -> list[dict[str, str]]:
    """``count`` messages over ``topics`` in turn, ``m<n>`` padded to ``size``."""
    return [
        {"topic": topics[n % len(topics)], "data": f"m{n}".ljust(size, ".")} for n in range(count)
    ]


async def subscribed(port: int, *topics: str) -> SSEStream:
    query = "&".join(f"topic={t}" for t in topics)
    stream = await SSEStream.open(port, f"/events?{query}")
    assert (await stream.config())["subscriptions"] == list(topics)
    return stream


async def received(stream: SSEStream, count: int) -> list[tuple[str, str, str]]:
    got = []
    for _ in range(count):
        event = await stream.event(e2e.DELIVERY_TIMEOUT_S)
        got.append((event["event"], event["id"], event["data"]))
    return got


async def check_batch(port: int, messages: list[dict[str, str]], status: int) -> list[Any]:
    """Publish ``messages`` (distinct data) as NDJSON to a node, expect
    ``status``, and see every one arrive on a stream of their topics, with
    its id; returns the ids."""
    topics = list(dict.fromkeys(m["topic"] for m in messages))
    stream = await subscribed(port, *topics)
    try:
        body = b"".join(orjson.dumps(m) + b"\n" for m in messages)
        r = await post(port, body, NDJSON)
        assert r.status_code == status, r.text
        ids: list[Any] = r.json()["ids"]
        assert len(ids) == len(messages)
        got = await received(stream, len(messages))
        # In order on each topic; across topics as the broker delivers them
        # (nats-py serves each subscription from its own queue).
        for topic in topics:
            sent = [m["data"] for m in messages if m["topic"] == topic]
            assert [d for t, _, d in got if t == topic] == sent, topic
        index = {m["data"]: n for n, m in enumerate(messages)}
        for _, frame_id, data in got:
            if ids[index[data]] is not None:
                assert frame_id == ids[index[data]], data
        await stream.no_frame()
        return ids
    finally:
        await stream.close()


# -- NATS ----------------------------------------------------------------------------


async def test_core_nats_batch_one_round_trip(nats_server: NatsServer) -> None:
    async with e2e.serving("nats", {"url": nats_server.url}) as node:
        ids = await check_batch(node.port, batch(["a", "b", "c"], 300), 202)
        assert ids == [None] * 300  # core NATS numbers nothing at publish time
        assert node.streamer.driver.stats()["published"] == 300
        # Over the server's max_payload: refused before any message is sent.
        stream = await subscribed(node.port, "a")
        messages = batch(["a"], 3)
        messages[1]["data"] = "x" * 5000
        r = await post(node.port, b"".join(orjson.dumps(m) + b"\n" for m in messages), NDJSON)
        assert r.status_code == 503, r.text
        answer = r.json()
        assert answer["ids"] == []
        assert "message 1 of 5000 bytes exceeds the NATS server's max_payload" in answer["error"]
        await stream.no_frame()
        await stream.close()


async def test_jetstream_batch_ids_are_consecutive_sequences(nats_server: NatsServer) -> None:
    name = "B" + secrets.token_hex(4).upper()
    options = {"url": nats_server.url, "jetstream": True, "prefix": "gochan.", "stream": name}
    async with e2e.serving("nats", options) as node:
        ids = await check_batch(node.port, batch(["a", "b"], 200), 200)
        first = int(ids[0])
        assert ids == [str(first + n) for n in range(200)]  # the batch's order is the stream's


async def test_jetstream_refusal_partway_says_what_was_published(nats_server: NatsServer) -> None:
    """A stream whose max_msg_size refuses the second message: 503 with the
    id of the first. Messages after the refused one were sent before its
    refusal came back: they may be published too (here they are)."""
    name = "P" + secrets.token_hex(4).upper()
    nc = await nats.connect(nats_server.url)
    try:
        config = api.StreamConfig(name=name, subjects=[f"{name}.>"], max_msg_size=100)
        await nc.jetstream().add_stream(config)
    finally:
        await nc.close()
    options = {"url": nats_server.url, "jetstream": True, "prefix": f"{name}.", "stream": name}
    async with e2e.serving("nats", options) as node:
        stream = await subscribed(node.port, "a")
        messages = batch(["a"], 3)
        messages[1]["data"] = "x" * 200
        r = await post(node.port, orjson.dumps(messages))
        assert r.status_code == 503, r.text
        answer = r.json()
        assert len(answer["ids"]) == 1 and answer["ids"][0].isdigit()
        assert answer["error"].startswith("publish failed at message 1: ")
        got = await received(stream, 2)
        assert got[0] == ("a", answer["ids"][0], "m0")
        assert got[1][2] == "m2"
        await stream.no_frame()
        await stream.close()


# -- Redis -----------------------------------------------------------------------------


async def test_redis_pubsub_batch_in_one_multi(redis_server: RedisServer) -> None:
    async with e2e.serving("redis", {"url": redis_server.url}) as node:
        ids = await check_batch(node.port, batch(["a", "b"], 300, size=50), 202)
        assert ids == [None] * 300


async def test_redis_refusing_one_message_publishes_none(redis_server: RedisServer) -> None:
    # The default user may publish on channels allowed* only.
    redis_server.extra_args = ["--user", "default", "on", "nopass", "~*", "resetchannels",
                               "&allowed*", "+@all"]  # fmt: skip
    await asyncio.to_thread(redis_server.restart)
    async with e2e.serving("redis", {"url": redis_server.url}) as node:
        stream = await subscribed(node.port, "allowed.1")
        messages = [{"topic": "allowed.1", "data": "yes"}, {"topic": "forbidden", "data": "no"}]
        r = await post(node.port, orjson.dumps(messages))
        assert r.status_code == 503, r.text
        answer = r.json()
        assert answer["ids"] == []
        assert "Redis refused the batch" in answer["error"]
        await stream.no_frame()  # all or nothing: the allowed one is not published either
        r = await post(node.port, orjson.dumps(messages[:1]))
        assert r.status_code == 202, r.text
        assert (await received(stream, 1))[0][2] == "yes"
        await stream.close()


async def test_redis_streams_batch_ids_are_entry_ids(redis_server: RedisServer) -> None:
    options = {"url": redis_server.url, "streams": True, "prefix": "b" + secrets.token_hex(3)}
    async with e2e.serving("redis", options) as node:
        ids = await check_batch(node.port, batch(["a", "b"], 200), 200)
        positions = [tuple(int(part) for part in i.split("-")) for i in ids]
        assert positions == sorted(positions) and len(set(positions)) == 200
