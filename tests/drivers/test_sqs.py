"""SqsDriver against a real SNS/SQS API: moto's server on a free loopback port.

Set ``GOCHAN_SQS_URL=http://host:port`` to use another endpoint (LocalStack,
a shared moto); the restart test then skips, since it restarts its own server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gochan.errors import ClosedError, InvalidTopicError

from . import _sqs_server, harness
from ._sqs_server import AwsServer
from .conftest import free_port, import_or_skip
from .harness import Recorder, connected, unique, wait_until

sqs = import_or_skip("gochan.drivers.sqs")
SqsDriver = sqs.SqsDriver

QUIET_S = 1.5  # how long "nothing arrives" is watched (longer than a long poll)
TEST_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsServer]:
    server = _sqs_server.obtain()
    yield server
    server.stop()


def make_driver(server: AwsServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("wait_time", 1)
    kwargs.setdefault("reconnect_max", 0.5)
    return SqsDriver(**server.driver_options(), **kwargs)


async def queue_names(server: AwsServer) -> list[str]:
    async with server.client("sqs") as client:
        urls = (await client.list_queues()).get("QueueUrls", [])
        return [u.rsplit("/", 1)[-1] for u in urls]


# -- tests ---------------------------------------------------------------------


def test_check_topic_maps_or_refuses_without_io() -> None:
    driver = SqsDriver(prefix="gc_")
    for ok in ["a", "orders_eu", "A-b_9", "x" * 253]:
        driver.check_topic(ok)
        assert driver.sns_topic(ok) == "gc_" + ok
    for bad in ["a.b", "a/b", "caf\u00e9", "a b", "x" * 254, ""]:
        with pytest.raises(InvalidTopicError):
            driver.check_topic(bad)
    with pytest.raises(ValueError):
        SqsDriver(prefix="bad.prefix")
    assert driver.queue_name.startswith("gc_q-") and driver.queue_name != SqsDriver().queue_name


@pytest.mark.parametrize(
    "data",
    [
        b"plain text",
        "h\u00e9llo\r\nw\u00f6rld \U0001f600".encode(),
        b"",
        b"\x00\xff\xfe",
        b"a\x00b",
    ],
)
def test_body_encoding_round_trips(data: bytes) -> None:
    message, attributes = sqs.encode_body(data)
    assert message  # SNS refuses empty messages
    envelope_attrs = {
        k: {"Type": "String", "Value": v["StringValue"]} for k, v in attributes.items()
    }
    assert sqs.decode_body(message, envelope_attrs) == data
    if data and b"\x00" not in data and b"\xff" not in data:
        assert message == data.decode() and attributes == {}  # text travels as text


async def test_plain_sns_publish_arrives_unchanged(aws: AwsServer) -> None:
    topic = unique("plain")
    text = "h\u00e9llo\r\nline two\n\U0001f600"

    async with connected(make_driver(aws)) as (driver, rec):
        await driver.subscribe(topic)
        async with aws.client("sns") as sns:
            arn = (await sns.create_topic(Name="gochan-" + topic))["TopicArn"]
            message_id = (await sns.publish(TopicArn=arn, Message=text))["MessageId"]
        await rec.wait_messages(1)
        assert rec.messages == [(topic, text.encode(), message_id)]


async def test_publish_reaches_every_instance_binary_included(aws: AwsServer) -> None:
    topic = unique("fanout")
    bodies = [b"text", b"\x00\xffbinary", b"", "\u20ac".encode()]

    async with (
        connected(make_driver(aws)) as (a, rec_a),
        connected(make_driver(aws)) as (b, rec_b),
    ):
        drivers, recs = [a, b], [rec_a, rec_b]
        for d in drivers:
            await d.subscribe(topic)
        ids = [await drivers[i % 2].publish(topic, b) for i, b in enumerate(bodies)]
        expected = sorted(zip([topic] * 4, bodies, ids, strict=True))
        for r in recs:
            await r.wait_messages(len(bodies))
            assert sorted(r.messages) == expected


async def test_publish_to_a_topic_nobody_created(aws: AwsServer) -> None:
    async with connected(make_driver(aws)) as (driver, _):
        event_id = await driver.publish(unique("fresh"), b"x")
        assert event_id
        assert driver.stats()["published"] == 1


async def test_subscribe_unsubscribe_open_and_close_the_sns_subscription(aws: AwsServer) -> None:
    t1, t2 = unique("sub-a"), unique("sub-b")

    async with connected(make_driver(aws)) as (driver, rec):
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        assert await aws.subscribed_queues("gochan-" + t1) == [driver.queue_arn]
        assert driver.stats()["subscriptions"] == 2
        await driver.publish(t1, b"one")
        await rec.wait_messages(1)
        await driver.unsubscribe(t1)
        await driver.unsubscribe(t1)  # harmless twice
        assert await aws.subscribed_queues("gochan-" + t1) == []
        assert await aws.subscribed_queues("gochan-" + t2) == [driver.queue_arn]
        await driver.publish(t1, b"after unsubscribe")
        await driver.publish(t2, b"two")
        await rec.wait_messages(2)
        await asyncio.sleep(QUIET_S)
        assert [(t, d) for t, d, _ in rec.messages] == [(t1, b"one"), (t2, b"two")]


async def test_invalid_topic_refused(aws: AwsServer) -> None:
    async with connected(make_driver(aws)) as (driver, _):
        with pytest.raises(InvalidTopicError):
            await driver.subscribe("dots.are.not.sns")
        with pytest.raises(InvalidTopicError):
            await driver.publish("a/b", b"x")


async def test_close_deletes_queue_and_subscriptions(aws: AwsServer) -> None:
    topic = unique("close")

    driver = make_driver(aws)
    await driver.connect(Recorder())
    await driver.subscribe(topic)
    assert driver.queue_name in await queue_names(aws)
    await driver.close()
    await driver.close()
    assert not driver.ready
    assert driver.queue_name not in await queue_names(aws)
    assert await aws.subscribed_queues("gochan-" + topic) == []
    with pytest.raises(ClosedError):
        await driver.subscribe(topic)


async def test_unreachable_endpoint_fails_promptly() -> None:
    driver = SqsDriver(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        timeout=1.0,
        access_key_id="a",
        secret_access_key="b",
    )
    await harness.check_connect_to_nothing(driver, 5.0)


def test_registry_builds_the_driver() -> None:
    harness.check_registry("sqs", {"prefix": "gc_", "region": "eu-west-1"}, SqsDriver)


async def test_server_restart_is_survived(aws: AwsServer) -> None:
    moto = aws.moto
    if moto is None:
        pytest.skip("restarts its own moto_server (GOCHAN_SQS_URL is set)")
    topic, other = unique("restart"), unique("restart-new")

    async with connected(make_driver(aws)) as (driver, rec):
        await driver.subscribe(topic)
        await driver.publish(topic, b"before")
        await rec.wait_messages(1)
        await asyncio.to_thread(moto.stop)  # moto forgets every queue and topic
        await wait_until(lambda: not driver.ready)
        await harness.check_refused_while_down(driver, other, topic, 4 * TEST_TIMEOUT_S)
        await asyncio.to_thread(moto.start)  # same port, empty state
        await wait_until(lambda: driver.ready)
        assert driver.stats()["reconnects"] == 1
        assert driver.stats()["subscriptions"] == 1
        assert await aws.subscribed_queues("gochan-" + topic) == [driver.queue_arn]
        await driver.publish(topic, b"after")
        await driver.subscribe(other)
        await driver.publish(other, b"new topic")
        await rec.wait_messages(3)
        assert [(t, d) for t, d, _ in rec.messages] == [
            (topic, b"before"),
            (topic, b"after"),
            (other, b"new topic"),
        ]
        assert rec.failures == []
