"""KafkaDriver against a real Kafka protocol server.

The broker is librdkafka's mock cluster (see ``_kafka_server.py``), started
once for this module; set ``GOCHAN_KAFKA_URL=host:port`` to use a real broker
instead (the outage test then skips: it needs the mock's down/up switch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gochan.errors import InvalidTopicError

from . import _kafka_server, harness
from ._kafka_server import KafkaServer
from .conftest import free_port, import_or_skip
from .harness import Recorder, connected, unique, wait_until

kafka = import_or_skip("gochan.drivers.kafka")
import_or_skip("confluent_kafka")
KafkaDriver = kafka.KafkaDriver

QUIET_S = 1.0  # how long "nothing arrives" is watched
TEST_TIMEOUT_S = 2.0  # the drivers' own timeout, kept short so failures are fast


@pytest.fixture(scope="module")
def kafka_server() -> Iterator[KafkaServer]:
    server = _kafka_server.obtain()
    yield server
    server.stop()


def make_driver(server: KafkaServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("health_interval", 0.2)
    kwargs.setdefault("reconnect_max", 0.2)
    return KafkaDriver(bootstrap_servers=server.bootstrap, **kwargs)


# -- tests ---------------------------------------------------------------------


def test_check_topic_maps_or_refuses_without_io() -> None:
    driver = KafkaDriver(bootstrap_servers="127.0.0.1:1", prefix="gc.")
    for ok in ["a", "orders_eu", "A.b-c_9", "x" * 246]:
        driver.check_topic(ok)
        assert driver.kafka_topic(ok) == "gc." + ok
    for bad in ["a/b", "caf\u00e9", "a b", "a:b", "x" * 247, ""]:
        with pytest.raises(InvalidTopicError):
            driver.check_topic(bad)
    bare = KafkaDriver(bootstrap_servers="127.0.0.1:1")
    for bad in [".", "..", "__consumer_offsets"]:
        with pytest.raises(InvalidTopicError):
            bare.check_topic(bad)
    with pytest.raises(ValueError):
        KafkaDriver(prefix="bad/prefix")


async def test_plain_producer_message_arrives_unchanged(kafka_server: KafkaServer) -> None:
    topic = unique("plain")
    body = b"\x00\xffbinary\r\nlines\n\xe2\x82\xac"

    async with connected(make_driver(kafka_server, prefix="gc-")) as (driver, rec):
        await driver.subscribe(topic)
        partition, offset = await asyncio.to_thread(kafka_server.produce, "gc-" + topic, body)
        await rec.wait_messages(1)
        assert rec.messages == [(topic, body, f"{partition}:{offset}")]


async def test_publish_reaches_every_instance(kafka_server: KafkaServer) -> None:
    topic = unique("fanout")

    async with (
        connected(make_driver(kafka_server)) as (a, rec_a),
        connected(make_driver(kafka_server)) as (b, rec_b),
    ):
        drivers, recs = [a, b], [rec_a, rec_b]
        for d in drivers:
            await d.subscribe(topic)
        ids = [await drivers[i % 2].publish(topic, f"m{i}".encode()) for i in range(6)]
        for r in recs:
            await r.wait_messages(6)
            got = sorted(r.messages, key=lambda m: m[1])
            assert got == [(topic, f"m{i}".encode(), ids[i]) for i in range(6)]
        assert drivers[0].stats()["subscriptions"] == 1


async def test_subscribe_unsubscribe_changes_the_assignment(kafka_server: KafkaServer) -> None:
    t1, t2 = unique("assign-a"), unique("assign-b")

    async with connected(make_driver(kafka_server)) as (driver, rec):
        await driver.publish(t1, b"before subscribe")  # must not be replayed
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        assigned = {tp.topic for tp in driver._consumer.assignment()}
        assert assigned == {t1, t2}
        await driver.publish(t1, b"one")
        await driver.publish(t2, b"two")
        await rec.wait_messages(2)
        await driver.unsubscribe(t1)
        assert {tp.topic for tp in driver._consumer.assignment()} == {t2}
        await driver.unsubscribe(t1)  # harmless twice
        await driver.publish(t1, b"after unsubscribe")
        await driver.publish(t2, b"still")
        await rec.wait_messages(3)
        await asyncio.sleep(QUIET_S)
        assert sorted((t, d) for t, d, _ in rec.messages) == sorted(
            [(t1, b"one"), (t2, b"two"), (t2, b"still")]
        )
        # Positions of the topic that stayed survived the reassignment.
        await driver.unsubscribe(t2)
        assert driver._consumer.assignment() == set()
        assert driver.stats()["subscriptions"] == 0
        await driver.subscribe(t1)
        await driver.publish(t1, b"again")
        await rec.wait_messages(4)
        assert rec.messages[-1][:2] == (t1, b"again")


async def test_invalid_topic_refused_before_io(kafka_server: KafkaServer) -> None:
    async with connected(make_driver(kafka_server)) as (driver, _):
        with pytest.raises(InvalidTopicError):
            await driver.subscribe("no/slashes")
        with pytest.raises(InvalidTopicError):
            await driver.publish("no spaces", b"x")
        assert driver.stats()["subscriptions"] == 0


async def test_close_is_idempotent_and_final(kafka_server: KafkaServer) -> None:
    topic = unique("close")

    driver = make_driver(kafka_server)
    await driver.connect(Recorder())
    await driver.subscribe(topic)
    assert driver.ready
    await driver.close()
    await driver.close()
    assert not driver.ready
    assert driver.stats()["subscriptions"] == 0
    await harness.check_closed(driver, topic)


async def test_unreachable_broker_fails_promptly() -> None:
    driver = KafkaDriver(bootstrap_servers=f"127.0.0.1:{free_port()}", timeout=1.0)
    await harness.check_connect_to_nothing(driver, 5.0)


def test_registry_builds_the_driver() -> None:
    options = {"bootstrap_servers": "127.0.0.1:1", "prefix": "gc."}
    harness.check_registry("kafka", options, KafkaDriver)


async def test_outage_is_survived(kafka_server: KafkaServer) -> None:
    mock = kafka_server.mock
    if mock is None:
        pytest.skip("needs the mock cluster's down/up switch (GOCHAN_KAFKA_URL is set)")
    topic, other = unique("outage"), unique("outage-new")

    async with connected(make_driver(kafka_server)) as (driver, rec):
        await driver.subscribe(topic)
        await driver.publish(topic, b"before")
        await rec.wait_messages(1)
        mock.command("down")
        try:
            await wait_until(lambda: not driver.ready)
            await harness.check_refused_while_down(driver, other, topic, 4 * TEST_TIMEOUT_S)
            assert driver.stats()["reconnects"] == 0
        finally:
            mock.command("up")
        await wait_until(lambda: driver.ready)
        stats = driver.stats()
        assert (stats["reconnects"], stats["subscriptions"], stats["published"]) == (1, 1, 1)
        await driver.publish(topic, b"after")
        await driver.subscribe(other)
        await driver.publish(other, b"new topic")
        await rec.wait_for(lambda: {b"after", b"new topic"} <= {d for _, d, _ in rec.messages})
        bodies = [d for _, d, _ in rec.messages]
        # "lost" may still arrive: the producer keeps retrying a record
        # after publish() gave up on it (an error means "outcome unknown").
        assert {b"before", b"after", b"new topic"} <= set(bodies)
        assert rec.failures == []
