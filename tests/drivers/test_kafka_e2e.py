"""The Kafka driver end to end through gochan's HTTP surface (tests/drivers/e2e.py),
on librdkafka's mock cluster (see ``_kafka_server.py``).

Kafka keeps no per-consumer state on the broker for the driver (manual
assignment, no group), so the subscription lifecycle is checked on the
driver's side only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from . import _kafka_server, e2e
from ._kafka_server import KafkaServer
from .conftest import import_or_skip

import_or_skip("gochan.drivers.kafka")
import_or_skip("confluent_kafka")

TIMEOUT_S = 2.0  # the driver's own timeout, kept short so an outage is seen soon
HEALTH_INTERVAL_S = 0.2
# Down for longer than the driver takes to notice: a probe's interval and timeout.
OUTAGE_S = HEALTH_INTERVAL_S + TIMEOUT_S + 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[KafkaServer]:
    kafka = _kafka_server.obtain()
    yield kafka
    kafka.stop()


def broker(server: KafkaServer) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        await asyncio.to_thread(server.produce, topic, data)  # no prefix configured

    async def restart() -> None:
        mock = server.mock
        assert mock is not None
        await asyncio.to_thread(mock.command, "down")
        try:
            await asyncio.sleep(OUTAGE_S)
        finally:
            await asyncio.to_thread(mock.command, "up")

    options = {
        "bootstrap_servers": server.bootstrap,
        "timeout": TIMEOUT_S,
        "health_interval": HEALTH_INTERVAL_S,
    }
    return e2e.Broker("kafka", options, publish, restart if server.mock else None)


async def test_relay(server: KafkaServer) -> None:
    await e2e.check_relay(broker(server))


async def test_subscription_lifecycle(server: KafkaServer) -> None:
    await e2e.check_subscription_lifecycle(broker(server))


async def test_broker_restart(server: KafkaServer) -> None:
    if server.mock is None:
        pytest.skip("needs the mock cluster's down/up switch (GOCHAN_KAFKA_URL is set)")
    await e2e.check_broker_restart(broker(server))


async def test_replay_on_the_same_node(server: KafkaServer) -> None:
    """Per-topic mode (no log_topic): gochan numbers the messages and replays
    them from memory on the node that held the topic, in the order they
    arrived (the mock's topics have several partitions: no publish order)."""
    await e2e.check_replay_on_the_same_node(broker(server), ordered=False)
