"""The Redis driver end to end through gochan's HTTP surface (tests/drivers/e2e.py),
on a redis-server of the test's own (restarted on the same port)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from . import e2e
from ._redis_server import RedisServer
from .conftest import import_or_skip

redis_asyncio = import_or_skip("redis.asyncio")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    yield from RedisServer.running()


def broker(server: RedisServer, **options: object) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        client = redis_asyncio.Redis.from_url(server.url)
        try:
            await client.publish(topic, data)  # a plain `redis-cli publish`: no prefix
        finally:
            await client.aclose()

    async def restart() -> None:
        await asyncio.to_thread(server.restart)

    async def subscribed(topic: str) -> bool:
        client = redis_asyncio.Redis.from_url(server.url)
        try:
            [(_channel, count)] = await client.pubsub_numsub(topic)
        finally:
            await client.aclose()
        return int(count) > 0

    return e2e.Broker("redis", {"url": server.url, **options}, publish, restart, subscribed)


async def test_relay(server: RedisServer) -> None:
    await e2e.check_relay(broker(server))


async def test_subscription_lifecycle(server: RedisServer) -> None:
    await e2e.check_subscription_lifecycle(broker(server))


async def test_replay_on_the_same_node(server: RedisServer) -> None:
    """Redis pub/sub keeps nothing: gochan's in-memory history replays."""
    await e2e.check_replay_on_the_same_node(broker(server))


async def test_streams_replay_on_the_same_node(server: RedisServer) -> None:
    """Redis Streams replays from the stream (tests/drivers/test_redis_replay.py
    has the other nodes, the restart and the gaps)."""
    await e2e.check_replay_on_the_same_node(broker(server, streams=True), via_broker=False)


async def test_broker_restart(server: RedisServer) -> None:
    await e2e.check_broker_restart(broker(server, reconnect_min=0.05, reconnect_max=0.5))
