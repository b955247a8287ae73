"""RabbitMQDriver against a real RabbitMQ (see _rabbitmq_server for which one).

Every test uses its own exchange (deleted at the end), so tests neither see
each other's messages nor leave anything behind on a shared broker.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelClosed, ChannelNotFoundEntity

from gochan.drivers.rabbitmq import RabbitMQDriver
from gochan.errors import (
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)

from . import _rabbitmq_server, e2e, harness
from ._rabbitmq_server import RabbitMQ, TcpProxy
from .conftest import free_port
from .harness import DELIVERY_TIMEOUT_S, Recorder, wait_until

PROMPT_S = 1.0  # "promptly": how long a refusal while disconnected may take


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMQ]:
    broker = _rabbitmq_server.obtain()
    yield broker
    broker.stop()


@pytest.fixture
def exchange(rabbitmq: RabbitMQ) -> Iterator[str]:
    """An exchange name of the test's own; the exchange is deleted afterwards."""
    name = f"gochan-test-{secrets.token_hex(6)}"
    yield name
    with suppress(Exception):
        asyncio.run(delete_exchange(rabbitmq.url, name))


@asynccontextmanager
async def plain_channel(url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """An ordinary aio-pika client, as any other application would use."""
    connection = await aio_pika.connect(url, timeout=DELIVERY_TIMEOUT_S)
    try:
        yield await connection.channel()
    finally:
        await connection.close()


async def plain_publish(url: str, exchange: str, routing_key: str, *bodies: bytes) -> None:
    async with plain_channel(url) as channel:
        ex = await channel.get_exchange(exchange)
        for body in bodies:
            await ex.publish(
                aio_pika.Message(body, content_type="application/octet-stream"),
                routing_key,
                mandatory=False,
            )


async def delete_exchange(url: str, exchange: str) -> None:
    async with plain_channel(url) as channel:
        await channel.exchange_delete(exchange)


async def queue_state(url: str, queue: str) -> str:
    """'gone', or 'exists' (an exclusive queue of another connection is locked)."""
    async with plain_channel(url) as channel:
        try:
            await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return "gone"
        except ChannelClosed as exc:
            if "RESOURCE_LOCKED" in str(exc):
                return "exists"
            raise
        return "exists"


def connected(
    url: str, exchange: str, **options: Any
) -> AbstractAsyncContextManager[tuple[RabbitMQDriver, Recorder]]:
    return harness.connected(RabbitMQDriver(url=url, exchange=exchange, **options))


# -- no broker needed ---------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["orders", "orders.eu.paris", "a*b", "chat#1", "*a", "é.ü", "x" * 255, "a..b", ".a", "a b"],
)
def test_mappable_topics(topic: str) -> None:
    RabbitMQDriver().check_topic(topic)  # no connection, no I/O


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("*", "wildcard"),
        ("#", "wildcard"),
        ("a.*.b", "wildcard"),
        ("orders.#", "wildcard"),
        ("*.x", "wildcard"),
        ("x" * 256, "255 bytes"),
        ("é" * 128, "255 bytes"),
        ("", "empty"),
        ("a\nb", "control"),
        ("a\x00b", "control"),
    ],
)
def test_unmappable_topics_are_refused(topic: str, reason: str) -> None:
    with pytest.raises(InvalidTopicError) as info:
        RabbitMQDriver().check_topic(topic)
    assert info.value.topic == topic
    assert (
        reason in info.value.reason
        or (reason == "wildcard" and "'*' or '#'" in info.value.reason)
        or (reason == "255 bytes" and "255" in info.value.reason)
    )
    assert isinstance(info.value, ValueError)


def test_bad_configuration_is_refused() -> None:
    for kwargs in ({"exchange": ""}, {"exchange": "amq.topic"}, {"timeout": 0}):
        with pytest.raises(ConfigurationError):
            RabbitMQDriver(**kwargs)


def test_registry_builds_the_driver() -> None:
    options = {"url": "amqp://u:p@h:1/", "exchange": "x"}
    harness.check_registry("rabbitmq", options, RabbitMQDriver)


async def test_connect_to_nothing_fails_promptly() -> None:
    driver = RabbitMQDriver(url=f"amqp://guest:guest@127.0.0.1:{free_port()}/", timeout=2)
    await harness.check_connect_to_nothing(driver, 5.0)


# -- against the broker -----------------------------------------------------------


async def test_plain_amqp_publish_arrives_unchanged(rabbitmq: RabbitMQ, exchange: str) -> None:
    body_bytes = bytes(range(256)) + b"\r\n\n\rdata: x\x00"

    async with connected(rabbitmq.url, exchange) as (driver, rec):
        assert driver.ready
        await driver.subscribe("orders.eu")
        await driver.subscribe("a*b")  # '*' inside a word is literal
        await plain_publish(rabbitmq.url, exchange, "orders.eu", body_bytes, b"", b"second")
        await plain_publish(rabbitmq.url, exchange, "axb", b"must not match a*b")
        await plain_publish(rabbitmq.url, exchange, "a*b", b"literal star")
        await rec.wait_body("a*b", b"literal star")
        await rec.wait_body("orders.eu", b"second")
        assert rec.bodies("orders.eu") == [body_bytes, b"", b"second"]
        assert rec.bodies("a*b") == [b"literal star"]
        assert all(event_id is None for _, _, event_id in rec.messages)
        assert rec.failures == []
        assert driver.stats()["subscriptions"] == 2


async def test_driver_publish_reaches_every_process(rabbitmq: RabbitMQ, exchange: str) -> None:
    """Two processes holding a topic both get every message: fan-out, not competition."""

    async with (
        connected(rabbitmq.url, exchange) as (one, rec1),
        connected(rabbitmq.url, exchange) as (two, rec2),
        connected(rabbitmq.url, exchange) as (three, rec3),
    ):
        assert one.queue_name != two.queue_name
        await harness.check_fan_out((one, rec1), (two, rec2), (three, rec3))


async def test_subscribe_and_unsubscribe_open_and_close_the_binding(
    rabbitmq: RabbitMQ, exchange: str
) -> None:
    async with connected(rabbitmq.url, exchange) as (driver, rec):
        # Nothing bound yet: a message published now is not routed to us.
        await plain_publish(rabbitmq.url, exchange, "t", b"before")
        await driver.subscribe("t")
        await driver.subscribe("sentinel")
        await plain_publish(rabbitmq.url, exchange, "t", b"bound")
        await rec.wait_body("t", b"bound")

        await driver.unsubscribe("t")
        assert driver.topics == {"sentinel"}
        # Same publisher, same route: had "after" been routed to our queue,
        # it would have arrived before the sentinel.
        await plain_publish(rabbitmq.url, exchange, "t", b"after")
        await plain_publish(rabbitmq.url, exchange, "sentinel", b"1")
        await rec.wait_body("sentinel", b"1")
        assert rec.bodies("t") == [b"bound"]
        # Not merely filtered out by the driver: the broker no longer routes it.
        assert driver.stats()["stray"] == 0
        if rabbitmq.ctl_available():
            assert await asyncio.to_thread(rabbitmq.bindings, exchange) == {
                (driver.queue_name, "sentinel")
            }

        await driver.unsubscribe("t")  # twice: harmless
        await driver.subscribe("t")
        await plain_publish(rabbitmq.url, exchange, "t", b"again")
        await rec.wait_body("t", b"again")
        assert rec.bodies("t") == [b"bound", b"again"]
        if rabbitmq.ctl_available():
            assert await asyncio.to_thread(rabbitmq.bindings, exchange) == {
                (driver.queue_name, "sentinel"),
                (driver.queue_name, "t"),
            }


async def test_close_deletes_the_queue_and_is_idempotent(rabbitmq: RabbitMQ, exchange: str) -> None:
    driver = RabbitMQDriver(url=rabbitmq.url, exchange=exchange)
    await driver.connect(Recorder())
    await driver.subscribe("t")
    queue = driver.queue_name
    assert queue is not None and queue.startswith("amq.gen-")
    assert await queue_state(rabbitmq.url, queue) == "exists"
    await driver.close()
    assert not driver.ready
    assert await queue_state(rabbitmq.url, queue) == "gone"
    await driver.close()
    await harness.check_closed(driver, "t")
    # The exchange is shared by every process and stays.
    async with plain_channel(rabbitmq.url) as channel:
        await channel.declare_exchange(exchange, "topic", durable=True, passive=True)


async def test_invalid_topics_are_refused_before_the_broker(
    rabbitmq: RabbitMQ, exchange: str
) -> None:
    async with connected(rabbitmq.url, exchange) as (driver, rec):
        for topic in ("a.*", "#", "x" * 256):
            with pytest.raises(InvalidTopicError):
                await driver.subscribe(topic)
            with pytest.raises(InvalidTopicError):
                await driver.publish(topic, b"x")
        assert driver.topics == frozenset()
        # The connection is untouched.
        await driver.subscribe("ok")
        await driver.publish("ok", b"fine")
        await rec.wait_body("ok", b"fine")
        assert driver.stats()["reconnects"] == 0


async def test_outage_then_recovery(rabbitmq: RabbitMQ, exchange: str) -> None:
    """The connection is cut and the broker unreachable for a while."""

    proxy = TcpProxy(rabbitmq.host, rabbitmq.port)
    await proxy.start()
    url = rabbitmq.url.replace(f":{rabbitmq.port}/", f":{proxy.port}/", 1)
    assert url != rabbitmq.url
    try:
        async with connected(url, exchange, reconnect_min=0.05, reconnect_max=0.3) as (
            driver,
            rec,
        ):
            for topic in ("kept.1", "kept.2", "dropped"):
                await driver.subscribe(topic)
            old_queue = driver.queue_name

            await proxy.stop()  # every connection cut, new ones refused
            await wait_until(lambda: not driver.ready, 5, "ready to turn False")
            await harness.check_refused_while_down(driver, "new", "kept.1", PROMPT_S)
            await driver.unsubscribe("dropped")  # forgotten locally
            await asyncio.sleep(0.5)  # a few failed reconnection attempts
            assert not driver.ready

            await proxy.start()
            await wait_until(lambda: driver.ready, 10, "reconnection")
            assert driver.stats()["reconnects"] == 1
            assert driver.queue_name != old_queue
            assert driver.topics == {"kept.1", "kept.2"}
            await plain_publish(rabbitmq.url, exchange, "dropped", b"no")
            await plain_publish(rabbitmq.url, exchange, "kept.1", b"one")
            await plain_publish(rabbitmq.url, exchange, "kept.2", b"two")
            await rec.wait_body("kept.1", b"one")
            await rec.wait_body("kept.2", b"two")
            assert rec.bodies("dropped") == []
            assert rec.failures == []  # a connection failure is no topic's failure
            # And it works as before.
            await driver.subscribe("new")
            await driver.publish("new", b"fresh")
            await rec.wait_body("new", b"fresh")
    finally:
        await proxy.stop()


async def test_server_side_close_rebinds_everything(rabbitmq: RabbitMQ, exchange: str) -> None:
    if not rabbitmq.ctl_available():
        pytest.skip("rabbitmqctl cannot reach this broker")
    name = f"gochan-test-{secrets.token_hex(4)}"

    async with connected(rabbitmq.url, exchange, connection_name=name, reconnect_min=0.05) as (
        driver,
        rec,
    ):
        topics = [f"room.{i}" for i in range(20)]
        for topic in topics:
            await driver.subscribe(topic)
        old_queue = driver.queue_name
        closed = await asyncio.to_thread(rabbitmq.close_connections, name)
        assert closed == 1
        await wait_until(lambda: driver.stats()["reconnects"] == 1 and driver.ready, 15, "rebind")
        assert driver.queue_name != old_queue
        assert old_queue is not None and await queue_state(rabbitmq.url, old_queue) == "gone"
        for topic in topics:
            await plain_publish(rabbitmq.url, exchange, topic, topic.encode())
        for topic in topics:
            await rec.wait_body(topic, topic.encode())
        assert rec.failures == []


async def test_only_topics_refused_on_reconnect_are_reported(
    rabbitmq: RabbitMQ, exchange: str
) -> None:
    """After a reconnect, a binding the broker now refuses (topic permissions)
    is reported for that topic alone; the other topics are restored."""
    if not rabbitmq.ctl_available():
        pytest.skip("rabbitmqctl cannot reach this broker")
    user = f"gochan_test_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    name = f"gochan-test-{secrets.token_hex(4)}"
    url = rabbitmq.url.replace("guest:guest@", f"{user}:{password}@", 1)
    assert url != rabbitmq.url

    def ctl(*args: str) -> Awaitable[str]:
        return asyncio.to_thread(rabbitmq.ctl, *args)

    await ctl("add_user", user, password)
    try:
        await ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        async with connected(url, exchange, connection_name=name, reconnect_min=0.05) as (
            driver,
            rec,
        ):
            for topic in ("public", "secret", "also.public"):
                await driver.subscribe(topic)
            await ctl("set_topic_permissions", "-p", "/", user, exchange, ".*", "^(?!secret)")
            # Refused now on a live connection: an error for the caller...
            with pytest.raises(BrokerError):
                await driver.subscribe("secret.sub")
            assert "secret.sub" not in driver.topics
            # ... after which the driver starts afresh (the channel died).
            await wait_until(lambda: driver.ready, 15, "recovery after a refused bind")
            assert rec.failures == [("secret", rec.failures[0][1])]
            assert "ACCESS_REFUSED" in rec.failures[0][1]
            assert driver.topics == {"public", "also.public"}
            await plain_publish(rabbitmq.url, exchange, "public", b"p")
            await plain_publish(rabbitmq.url, exchange, "also.public", b"ap")
            await rec.wait_body("public", b"p")
            await rec.wait_body("also.public", b"ap")
            assert driver.stats()["failures"] == 1
    finally:
        await ctl("delete_user", user)


# -- end to end, through gochan's HTTP surface (tests/drivers/e2e.py) -------------


def e2e_broker(
    rabbitmq: RabbitMQ,
    exchange: str,
    url: str | None = None,
    restart: Callable[[], Awaitable[None]] | None = None,
) -> e2e.Broker:
    async def publish(topic: str, data: bytes) -> None:
        await plain_publish(rabbitmq.url, exchange, topic, data)

    async def subscribed(topic: str) -> bool:
        bindings = await asyncio.to_thread(rabbitmq.bindings, exchange)
        return any(key == topic for _, key in bindings)

    options = {
        "url": url or rabbitmq.url,
        "exchange": exchange,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
    }
    probe = subscribed if rabbitmq.ctl_available() else None
    return e2e.Broker("rabbitmq", options, publish, restart, probe)


async def test_e2e_relay(rabbitmq: RabbitMQ, exchange: str) -> None:
    await e2e.check_relay(e2e_broker(rabbitmq, exchange))


async def test_e2e_subscription_lifecycle(rabbitmq: RabbitMQ, exchange: str) -> None:
    await e2e.check_subscription_lifecycle(e2e_broker(rabbitmq, exchange))


async def test_e2e_replay_on_the_same_node(rabbitmq: RabbitMQ, exchange: str) -> None:
    await e2e.check_replay_on_the_same_node(e2e_broker(rabbitmq, exchange))


async def test_e2e_broker_restart(rabbitmq: RabbitMQ, exchange: str) -> None:
    """The broker, as seen through a relay, goes away and comes back."""

    proxy = TcpProxy(rabbitmq.host, rabbitmq.port)
    await proxy.start()

    async def restart() -> None:
        await proxy.stop()
        await asyncio.sleep(0.5)
        await proxy.start()

    url = rabbitmq.url.replace(f":{rabbitmq.port}/", f":{proxy.port}/", 1)
    try:
        await e2e.check_broker_restart(e2e_broker(rabbitmq, exchange, url, restart))
    finally:
        await proxy.stop()
