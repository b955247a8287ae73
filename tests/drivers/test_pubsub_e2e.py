"""The Pub/Sub driver end to end through gochan's HTTP surface (tests/drivers/e2e.py),
on the Pub/Sub emulator (see ``_pubsub_server.py``), killed and restarted on
the same port for the outage."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from . import _pubsub_server, e2e
from ._pubsub_server import PROJECT, PubSubServer
from .conftest import import_or_skip

pubsub = import_or_skip("gochan.drivers.pubsub")
import_or_skip("google.cloud.pubsub_v1")


@pytest.fixture(scope="module")
def server() -> Iterator[PubSubServer]:
    emulator = _pubsub_server.obtain()
    yield emulator
    emulator.stop()


def broker(server: PubSubServer) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        # Google's own client; the topic id of a gochan topic (no prefix configured).
        await asyncio.to_thread(server.publish, pubsub.topic_id(topic), data)

    async def restart() -> None:
        emulator = server.emulator
        assert emulator is not None
        await asyncio.to_thread(emulator.stop)  # it forgets topics and subscriptions
        await asyncio.to_thread(emulator.start)

    async def subscribed(topic: str) -> bool:
        return bool(await server.subscriptions(pubsub.topic_id(topic)))

    options: dict[str, Any] = {
        "project": PROJECT,
        "emulator_host": server.host,
        # The emulator is a JVM: on a loaded machine its first answers take seconds.
        "timeout": 10.0,
        "pull_timeout": 2,
        "reconnect_max": 0.5,
    }
    return e2e.Broker("pubsub", options, publish, restart if server.emulator else None, subscribed)


async def test_relay(server: PubSubServer) -> None:
    await e2e.check_relay(broker(server))


async def test_subscription_lifecycle(server: PubSubServer) -> None:
    await e2e.check_subscription_lifecycle(broker(server))


async def test_replay_on_the_same_node(server: PubSubServer) -> None:
    await e2e.check_replay_on_the_same_node(broker(server))


async def test_broker_restart(server: PubSubServer) -> None:
    if server.emulator is None:
        pytest.skip("restarts its own emulator (GOCHAN_PUBSUB_EMULATOR_HOST is set)")
    await e2e.check_broker_restart(broker(server))
