"""The NATS driver end to end through gochan's HTTP surface (tests/drivers/e2e.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import orjson
import pytest

from tests.support import SSEStream

from . import e2e
from ._nats_server import NatsServer


@pytest.fixture
def server() -> Iterator[NatsServer]:
    yield from NatsServer.running()


def broker(server: NatsServer, **options: object) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        nc = await nats.connect(server.url)
        try:
            await nc.publish(topic, data)  # a plain `nats pub`: no prefix configured
            await nc.flush()
        finally:
            await nc.close()

    async def restart() -> None:
        await asyncio.to_thread(server.restart)

    async def subscribed(topic: str) -> bool:
        subs = await asyncio.to_thread(server.subscriptions, "gochan")
        return topic in subs

    return e2e.Broker("nats", {"url": server.url, **options}, publish, restart, subscribed)


async def test_relay(server: NatsServer) -> None:
    await e2e.check_relay(broker(server))


async def test_subscription_lifecycle(server: NatsServer) -> None:
    await e2e.check_subscription_lifecycle(broker(server))


async def test_replay_on_the_same_node(server: NatsServer) -> None:
    """Core NATS (no JetStream): gochan's in-memory history replays."""
    await e2e.check_replay_on_the_same_node(broker(server))


async def test_broker_restart(server: NatsServer) -> None:
    await e2e.check_broker_restart(broker(server, reconnect_min=0.1, reconnect_max=0.5))


async def test_replay_across_a_time_nobody_held_the_topic_is_not_claimed(
    server: NatsServer,
) -> None:
    """Core NATS keeps nothing: while no client held the topic, a plain
    `nats pub` went nowhere, and gochan cannot know whether one happened."""
    b = broker(server)
    topic = b.topic("gap")
    async with e2e.nodes(b, 1) as (node,):
        stream = await SSEStream.open(node.port, f"/events?topic={topic}")
        client_id = (await stream.config())["config"]["client_id"]
        await b.publish(topic, b"seen")
        last = (await stream.event())["id"]
        await stream.close()
        await node.streamer.remove_client(client_id)
        await b.publish(topic, b"went nowhere")
        again = await SSEStream.open(node.port, f"/events?topic={topic}", {"Last-Event-ID": last})
        await again.config()
        replay = orjson.loads((await again.event())["data"])["replay"]
        assert replay == {"last_event_id": last, "recovered": False}
        await again.close()
