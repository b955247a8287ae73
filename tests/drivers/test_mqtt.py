"""MqttDriver against real MQTT brokers (see _mqtt_server for which ones).

Tests on the shared broker keep to a random topic prefix of their own. Tests
that kill the broker or read its log run a Mosquitto of their own.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiomqtt
import pytest

from gochan.drivers.mqtt import MqttDriver
from gochan.errors import (
    ConfigurationError,
    InvalidTopicError,
)

from . import _mqtt_server, e2e, harness
from ._mqtt_server import Mosquitto, MqttBroker
from .conftest import free_port
from .harness import DELIVERY_TIMEOUT_S, Recorder, wait_until

PROMPT_S = 1.0  # "promptly": how long a refusal while disconnected may take


@pytest.fixture(scope="module")
def mqtt() -> Iterator[MqttBroker]:
    broker = _mqtt_server.obtain()
    yield broker
    if broker.own is not None:
        broker.own.close()


@pytest.fixture
def own_mosquitto() -> Iterator[Mosquitto]:
    """A broker of this test's own, to kill or to read the log of."""
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.close()


@pytest.fixture
def prefix() -> str:
    return f"gochan-test/{secrets.token_hex(4)}/"


def connected(
    broker: MqttBroker, **options: Any
) -> AbstractAsyncContextManager[tuple[MqttDriver, Recorder]]:
    return harness.connected(MqttDriver(**{**broker.driver_options(), **options}))


@asynccontextmanager
async def plain_client(broker: MqttBroker) -> AsyncIterator[aiomqtt.Client]:
    """An ordinary MQTT client, as any other application would use."""
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username or None,
        password=broker.password or None,
        timeout=DELIVERY_TIMEOUT_S,
    ) as client:
        yield client


async def plain_publish(
    broker: MqttBroker, topic: str, *bodies: bytes, qos: int = 1, retain: bool = False
) -> None:
    async with plain_client(broker) as client:
        for body in bodies:
            await client.publish(topic, body, qos=qos, retain=retain)


# -- no broker needed ---------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["sensors/kitchen/temp", "a//b", "/leading", "trailing/", "é/ü", "a b", "x" * 256, "a$b"],
)
def test_mappable_topics(topic: str) -> None:
    MqttDriver().check_topic(topic)  # no connection, no I/O


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("+", "wildcards"),
        ("#", "wildcards"),
        ("a/+/b", "wildcards"),
        ("a/#", "wildcards"),
        ("chat#1", "wildcards"),
        ("$SYS/broker/uptime", "reserved"),
        ("$share/g/t", "reserved"),
        ("a\ufffe", "non-character"),
        ("a\ufdd0", "non-character"),
        ("a\U0001ffff", "non-character"),
        ("a\x85b", "control"),
        ("a\x00b", "control"),
        ("", "empty"),
        ("x" * 257, "256 bytes"),
    ],
)
def test_unmappable_topics_are_refused(topic: str, reason: str) -> None:
    with pytest.raises(InvalidTopicError) as info:
        MqttDriver().check_topic(topic)
    assert info.value.topic == topic
    assert reason in info.value.reason
    assert isinstance(info.value, ValueError)


def test_prefix_lifts_the_dollar_rule() -> None:
    driver = MqttDriver(prefix="gochan/")
    driver.check_topic("$price")  # "gochan/$price" is an ordinary topic
    with pytest.raises(InvalidTopicError):
        driver.check_topic("a/+")


def test_bad_configuration_is_refused() -> None:
    for kwargs in (
        {"qos": 3},
        {"prefix": "$SYS/"},
        {"prefix": "a/+/"},
        {"prefix": "#"},
        {"port": 0},
        {"timeout": 0},
    ):
        with pytest.raises(ConfigurationError):
            MqttDriver(**kwargs)


def test_registry_builds_the_driver() -> None:
    options = {"host": "example", "port": 1884, "qos": 0}
    harness.check_registry("mqtt", options, MqttDriver)


async def test_connect_to_nothing_fails_promptly() -> None:
    driver = MqttDriver(port=free_port(), timeout=2)
    await harness.check_connect_to_nothing(driver, 5.0)


# -- against the broker -----------------------------------------------------------


@pytest.mark.parametrize("qos", [0, 1])
async def test_plain_mqtt_publish_arrives_unchanged(
    mqtt: MqttBroker, prefix: str, qos: int
) -> None:
    binary = bytes(range(256)) + b"\r\n\n\rdata: x\x00"

    async with connected(mqtt, qos=qos) as (driver, rec):
        assert driver.ready
        await driver.subscribe(prefix + "orders")
        await plain_publish(mqtt, prefix + "orders", binary, b"", b"second", qos=qos)
        await rec.wait_body(prefix + "orders", b"second")
        assert rec.bodies(prefix + "orders") == [binary, b"", b"second"]
        assert all(event_id is None for _, _, event_id in rec.messages)
        assert rec.failures == []


async def test_mosquitto_pub_arrives_unchanged(mqtt: MqttBroker, prefix: str) -> None:
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub is None:
        pytest.skip("mosquitto_pub is not installed")
    binary = bytes(range(1, 256)) + b"\n\r\n"

    async with connected(mqtt) as (driver, rec):
        await driver.subscribe(prefix + "cli")
        auth = ["-u", mqtt.username, "-P", mqtt.password] if mqtt.username else []
        process = await asyncio.create_subprocess_exec(
            mosquitto_pub,
            "-h",
            mqtt.host,
            "-p",
            str(mqtt.port),
            *auth,
            "-q",
            "1",
            "-t",
            prefix + "cli",
            "-s",  # the message is stdin, byte for byte
            stdin=asyncio.subprocess.PIPE,
        )
        await process.communicate(binary)
        assert process.returncode == 0
        await rec.wait_body(prefix + "cli", binary)
        assert rec.bodies(prefix + "cli") == [binary]


async def test_prefix_maps_topics(mqtt: MqttBroker, prefix: str) -> None:
    async with connected(mqtt, prefix=prefix) as (driver, rec):
        await driver.subscribe("room/1")
        await plain_publish(mqtt, "room/1", b"outside the prefix")
        await plain_publish(mqtt, prefix + "room/1", b"inside")
        await rec.wait_body("room/1", b"inside")
        await driver.publish("room/1", b"from the driver")
        await rec.wait_body("room/1", b"from the driver")
        assert rec.bodies("room/1") == [b"inside", b"from the driver"]


async def test_driver_publish_reaches_every_process(mqtt: MqttBroker, prefix: str) -> None:
    """Two processes holding a topic both get every message: fan-out."""

    async with (
        connected(mqtt, prefix=prefix) as (one, rec1),
        connected(mqtt, prefix=prefix) as (two, rec2),
        connected(mqtt, prefix=prefix) as (three, rec3),
    ):
        assert one.client_id != two.client_id
        await harness.check_fan_out((one, rec1), (two, rec2), (three, rec3))
        assert three.stats()["stray"] == 0


async def test_subscribe_and_unsubscribe_open_and_close_the_subscription(
    own_mosquitto: Mosquitto,
) -> None:
    broker = own_mosquitto.broker()

    async with connected(broker) as (driver, rec):
        await plain_publish(broker, "t", b"before")
        await driver.subscribe("t")
        await driver.subscribe("sentinel")
        await plain_publish(broker, "t", b"subscribed")
        await rec.wait_body("t", b"subscribed")

        await driver.unsubscribe("t")
        assert driver.topics == {"sentinel"}
        # Same publisher, same connection: had "after" been sent to us, it
        # would have arrived before the sentinel.
        await plain_publish(broker, "t", b"after", qos=1)
        await plain_publish(broker, "sentinel", b"1", qos=1)
        await rec.wait_body("sentinel", b"1")
        assert rec.bodies("t") == [b"subscribed"]
        assert driver.stats()["stray"] == 0  # the broker did not send it at all

        await driver.unsubscribe("t")  # twice: harmless
        await driver.subscribe("t")
        await plain_publish(broker, "t", b"again")
        await rec.wait_body("t", b"again")
        # Seen from the broker: one SUBSCRIBE/UNSUBSCRIBE per call, no more.
        await wait_until(
            lambda: len(own_mosquitto.subscriptions(driver.client_id)) >= 4, 5, "broker log"
        )
        assert own_mosquitto.subscriptions(driver.client_id) == [
            ("subscribe", "t"),
            ("subscribe", "sentinel"),
            ("unsubscribe", "t"),
            ("subscribe", "t"),
        ]


async def test_retained_messages_are_not_replayed(mqtt: MqttBroker, prefix: str) -> None:
    topic = prefix + "state"
    await plain_publish(mqtt, topic, b"old state", retain=True)
    try:
        async with connected(mqtt) as (driver, rec):
            await driver.subscribe(topic)
            await driver.subscribe(prefix + "sentinel")
            await plain_publish(mqtt, topic, b"live", retain=True)  # live: delivered
            await plain_publish(mqtt, prefix + "sentinel", b"1")
            await rec.wait_body(prefix + "sentinel", b"1")
            await rec.wait_body(topic, b"live")
            assert rec.bodies(topic) == [b"live"]
    finally:
        await plain_publish(mqtt, topic, b"", retain=True)  # clears it


async def test_invalid_topics_are_refused_before_the_broker(mqtt: MqttBroker, prefix: str) -> None:
    async with connected(mqtt, prefix=prefix) as (driver, rec):
        for topic in ("a/+", "#", "x\ufffe"):
            with pytest.raises(InvalidTopicError):
                await driver.subscribe(topic)
            with pytest.raises(InvalidTopicError):
                await driver.publish(topic, b"x")
        assert driver.topics == frozenset()
        await driver.subscribe("ok")  # the connection is untouched
        await driver.publish("ok", b"fine")
        await rec.wait_body("ok", b"fine")
        assert driver.stats()["reconnects"] == 0


async def test_close_is_idempotent(own_mosquitto: Mosquitto) -> None:
    driver = MqttDriver(host="127.0.0.1", port=own_mosquitto.port)
    await driver.connect(Recorder())
    await driver.subscribe("t")
    await driver.close()
    await driver.close()
    assert not driver.ready
    await harness.check_closed(driver, "t")
    await wait_until(
        lambda: f"Client {driver.client_id} disconnected" in own_mosquitto.log(),
        5,
        "the broker to see the disconnection",
    )


async def test_broker_restart_mid_stream(own_mosquitto: Mosquitto) -> None:
    broker = own_mosquitto.broker()

    async with connected(broker, reconnect_min=0.05, reconnect_max=0.3) as (driver, rec):
        for topic in ("kept/1", "kept/2", "dropped"):
            await driver.subscribe(topic)
        await plain_publish(broker, "kept/1", b"before")
        await rec.wait_body("kept/1", b"before")

        await asyncio.to_thread(own_mosquitto.kill)
        await wait_until(lambda: not driver.ready, 5, "ready to turn False")
        await harness.check_refused_while_down(driver, "new", "kept/1", PROMPT_S)
        await driver.unsubscribe("dropped")  # forgotten locally
        await asyncio.sleep(0.5)  # a few failed reconnection attempts
        assert not driver.ready

        await asyncio.to_thread(own_mosquitto.start)  # same port, empty broker
        await wait_until(lambda: driver.ready, 10, "reconnection")
        assert driver.stats()["reconnects"] == 1
        assert driver.topics == {"kept/1", "kept/2"}
        await plain_publish(broker, "dropped", b"no")
        await plain_publish(broker, "kept/1", b"one")
        await plain_publish(broker, "kept/2", b"two")
        await rec.wait_body("kept/1", b"one")
        await rec.wait_body("kept/2", b"two")
        assert rec.bodies("dropped") == []
        assert driver.stats()["stray"] == 0
        assert rec.failures == []  # a connection failure is no topic's failure
        # The restarted broker got the subscriptions again, "dropped" excepted.
        events = own_mosquitto.subscriptions(driver.client_id)
        assert sorted(events[-2:]) == [("subscribe", "kept/1"), ("subscribe", "kept/2")]
        assert events.count(("subscribe", "dropped")) == 1
        await driver.subscribe("new")  # and it works as before
        await driver.publish("new", b"fresh")
        await rec.wait_body("new", b"fresh")


# -- end to end, through gochan's HTTP surface (tests/drivers/e2e.py) -------------


def e2e_broker(mosquitto: Mosquitto) -> e2e.Broker:
    broker = mosquitto.broker()

    async def publish(topic: str, data: bytes) -> None:
        await plain_publish(broker, topic, data)

    async def restart() -> None:
        await asyncio.to_thread(mosquitto.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(mosquitto.start)

    async def subscribed(topic: str) -> bool:
        return await asyncio.to_thread(mosquitto.topic_subscribed, topic)

    options = {**broker.driver_options(), "reconnect_min": 0.05, "reconnect_max": 0.5}
    return e2e.Broker("mqtt", options, publish, restart, subscribed)


async def test_e2e_relay(own_mosquitto: Mosquitto) -> None:
    await e2e.check_relay(e2e_broker(own_mosquitto))


async def test_e2e_subscription_lifecycle(own_mosquitto: Mosquitto) -> None:
    await e2e.check_subscription_lifecycle(e2e_broker(own_mosquitto))


async def test_e2e_replay_on_the_same_node(own_mosquitto: Mosquitto) -> None:
    await e2e.check_replay_on_the_same_node(e2e_broker(own_mosquitto))


async def test_e2e_broker_restart(own_mosquitto: Mosquitto) -> None:
    await e2e.check_broker_restart(e2e_broker(own_mosquitto))
