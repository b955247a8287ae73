"""PubSubDriver against the Google Cloud Pub/Sub emulator on a free loopback
port (see ``_pubsub_server.py``; ``GOCHAN_PUBSUB_EMULATOR_HOST=host:port``
uses a running one instead, and the restart tests then skip, since they
restart their own emulator).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gochan.errors import BrokerError, ClosedError, InvalidTopicError

from . import _pubsub_server, harness
from ._pubsub_server import PROJECT, PubSubServer
from .conftest import free_port, import_or_skip
from .harness import Recorder, connected, unique, wait_until

pubsub = import_or_skip("gochan.drivers.pubsub")
import_or_skip("google.cloud.pubsub_v1")
PubSubDriver = pubsub.PubSubDriver

DELIVERY_TIMEOUT_S = 15.0
QUIET_S = 1.0
TEST_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def server() -> Iterator[PubSubServer]:
    emulator = _pubsub_server.obtain()
    yield emulator
    emulator.stop()


def make_driver(server: PubSubServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("pull_timeout", 2)
    kwargs.setdefault("reconnect_max", 0.5)
    return PubSubDriver(project=PROJECT, emulator_host=server.host, **kwargs)


def connected_to(server: PubSubServer, **kwargs: Any) -> Any:
    """A driver on ``server``, connected to a patient recorder (the emulator is slow)."""
    return connected(make_driver(server, **kwargs), Recorder(timeout=DELIVERY_TIMEOUT_S))


async def subscriptions_of(server: PubSubServer, driver: Any, topic: str) -> list[str]:
    return await server.subscriptions(driver.topic_id(topic))


# -- tests ---------------------------------------------------------------------


def test_topic_mapping_is_reversible_and_checked_without_io() -> None:
    driver = PubSubDriver(prefix="gc.")
    cases = {
        "orders": "gc.orders",
        "chat/room 1": "gc.chat%2Froom%201",
        "caf\u00e9": "gc.caf%C3%A9",
        "100%": "gc.100%25",
        "a~b+c_d-e.f": "gc.a~b+c_d-e.f",
    }
    for topic, tid in cases.items():
        driver.check_topic(topic)
        assert driver.topic_id(topic) == tid
        assert pubsub.gochan_topic(tid, "gc.") == topic
    bare = PubSubDriver()
    for bad in ["1abc", "ab", "googles", "/x", "x" * 256, ""]:
        with pytest.raises(InvalidTopicError):
            bare.check_topic(bad)
    bare.check_topic("abc")
    with pytest.raises(ValueError):
        PubSubDriver(prefix="9lives")


async def test_official_client_message_arrives_unchanged(server: PubSubServer) -> None:
    topic = unique("plain/with space")
    body = b"\x00\xff\xfebinary\r\nlines\n\xe2\x82\xac>>>???"

    async with connected_to(server) as (driver, rec):
        await driver.subscribe(topic)
        message_id = await asyncio.to_thread(server.publish, driver.topic_id(topic), body)
        await rec.wait_messages(1)
        assert rec.messages == [(topic, body, message_id)]


async def test_publish_reaches_every_instance(server: PubSubServer) -> None:
    topic = unique("fanout")
    bodies = [b"one", b"", b"\x00\x01", "\u20ac".encode()]

    async with connected_to(server) as (a, rec_a), connected_to(server) as (b, rec_b):
        drivers, recs = [a, b], [rec_a, rec_b]
        for d in drivers:
            await d.subscribe(topic)
        ids = [await drivers[i % 2].publish(topic, b) for i, b in enumerate(bodies)]
        expected = sorted(zip([topic] * len(bodies), bodies, ids, strict=True))
        for r in recs:
            await r.wait_messages(len(bodies))
            assert sorted(r.messages) == expected


async def test_subscribe_unsubscribe_open_and_close_the_subscription(server: PubSubServer) -> None:
    t1, t2 = unique("sub-a"), unique("sub-b")

    async with connected_to(server) as (driver, rec):
        await driver.publish(t1, b"before subscribe")  # creates the topic; not delivered
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        (sub1,) = await subscriptions_of(server, driver, t1)
        assert driver.process_token in sub1
        assert len(await subscriptions_of(server, driver, t2)) == 1
        await driver.publish(t1, b"one")
        await rec.wait_messages(1)
        await driver.unsubscribe(t1)
        await driver.unsubscribe(t1)  # harmless twice
        assert await subscriptions_of(server, driver, t1) == []
        await driver.publish(t1, b"after unsubscribe")
        await driver.publish(t2, b"two")
        await rec.wait_messages(2)
        await asyncio.sleep(QUIET_S)
        assert [(t, d) for t, d, _ in rec.messages] == [(t1, b"one"), (t2, b"two")]
        assert driver.stats()["subscriptions"] == 1


async def test_without_create_topics_a_missing_topic_is_an_error(server: PubSubServer) -> None:
    async with connected_to(server, create_topics=False) as (driver, _):
        with pytest.raises(BrokerError):
            await driver.subscribe(unique("missing"))
        with pytest.raises(BrokerError):
            await driver.publish(unique("missing"), b"x")
        with pytest.raises(InvalidTopicError):
            await driver.subscribe("goog-reserved")
        assert driver.stats()["subscriptions"] == 0


async def test_close_deletes_the_subscriptions(server: PubSubServer) -> None:
    topic = unique("close")

    driver = make_driver(server)
    await driver.connect(Recorder())
    await driver.subscribe(topic)
    assert len(await subscriptions_of(server, driver, topic)) == 1
    await driver.close()
    await driver.close()
    assert not driver.ready
    assert await subscriptions_of(server, driver, topic) == []
    with pytest.raises(ClosedError):
        await driver.subscribe(topic)


async def test_unreachable_service_fails_promptly() -> None:
    driver = PubSubDriver(emulator_host=f"127.0.0.1:{free_port()}", timeout=1.0)
    await harness.check_connect_to_nothing(driver, 5.0)


def test_registry_builds_the_driver() -> None:
    options = {"project": PROJECT, "emulator_host": "127.0.0.1:1", "prefix": "gc."}
    harness.check_registry("pubsub", options, PubSubDriver)


async def test_emulator_restart_is_survived(server: PubSubServer) -> None:
    emulator = server.emulator
    if emulator is None:
        pytest.skip("restarts its own emulator (GOCHAN_PUBSUB_EMULATOR_HOST is set)")
    topic, other = unique("restart"), unique("restart-new")

    async with connected_to(server) as (driver, rec):
        await driver.subscribe(topic)
        await driver.publish(topic, b"before")
        await rec.wait_messages(1)
        await asyncio.to_thread(emulator.stop)  # it forgets topics and subscriptions
        await wait_until(lambda: not driver.ready, DELIVERY_TIMEOUT_S)
        await harness.check_refused_while_down(driver, other, topic, 4 * TEST_TIMEOUT_S)
        await asyncio.to_thread(emulator.start)  # same port, empty state
        await wait_until(lambda: driver.ready, timeout=30)
        assert driver.stats()["reconnects"] == 1
        assert len(await subscriptions_of(server, driver, topic)) == 1
        await driver.publish(topic, b"after")
        await driver.subscribe(other)
        await driver.publish(other, b"new topic")
        await rec.wait_messages(3)
        assert sorted((t, d) for t, d, _ in rec.messages) == sorted(
            [(topic, b"before"), (topic, b"after"), (other, b"new topic")]
        )
        assert rec.failures == []


async def test_a_subscription_that_cannot_be_restored_is_reported(server: PubSubServer) -> None:
    emulator = server.emulator
    if emulator is None:
        pytest.skip("restarts its own emulator (GOCHAN_PUBSUB_EMULATOR_HOST is set)")
    topic = unique("doomed")

    async with connected_to(server, create_topics=False) as (driver, rec):
        await asyncio.to_thread(server.publish, driver.topic_id(topic), b"x")
        await driver.subscribe(topic)
        # The restarted emulator has no topic, and the driver may not create one.
        await asyncio.to_thread(emulator.stop)
        await wait_until(lambda: not driver.ready, DELIVERY_TIMEOUT_S)
        await asyncio.to_thread(emulator.start)
        await rec.wait_for(lambda: bool(rec.failures), timeout=30)
        assert [t for t, _ in rec.failures] == [topic]
        assert driver.ready
        assert driver.stats()["subscriptions"] == 0
        assert driver.stats()["reconnects"] == 1
        await driver.unsubscribe(topic)  # the streamer's follow-up is harmless
