"""SqsDriver against a real SNS/SQS API: moto's server on a free loopback port.

Set ``GOCHAN_SQS_URL=http://host:port`` to use another endpoint (LocalStack,
a shared moto); the restart test then skips, since it restarts its own server.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from gochan.errors import BrokerConnectionError, BrokerError, ClosedError, InvalidTopicError

from .conftest import broker_unavailable, free_port, port_open


def import_or_skip(module: str) -> Any:
    """pytest.importorskip, except that CI (GOCHAN_REQUIRE_BROKERS=1) must have it."""
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


sqs = import_or_skip("gochan.drivers.sqs")
import_or_skip("moto.server")
get_session = import_or_skip("aiobotocore.session").get_session

SqsDriver = sqs.SqsDriver

REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
SERVER_START_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 10.0
QUIET_S = 1.5  # how long "nothing arrives" is watched (longer than a long poll)
TEST_TIMEOUT_S = 2.0

_T = TypeVar("_T")


# -- helpers -----------------------------------------------------------------


def run(coro: Awaitable[_T]) -> _T:
    """asyncio.run that also fails on exceptions nobody retrieved."""
    errors: list[dict[str, Any]] = []

    async def main() -> _T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        return await coro

    result = asyncio.run(main())
    assert not errors, f"unhandled exceptions in the event loop: {errors}"
    return result


@dataclass
class Recorder:
    """The streamer's stand-in: records what the driver delivers."""

    messages: list[tuple[str, bytes, str | None]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_message(self, topic: str, data: bytes, event_id: str | None) -> None:
        self.messages.append((topic, data, event_id))
        self.changed.set()

    def on_subscription_failure(self, topic: str, message: str) -> None:
        self.failures.append((topic, message))
        self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT_S) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not pred():
            self.changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self.changed.wait(), max(0.0, remaining))

    async def wait_messages(self, n: int) -> list[tuple[str, bytes, str | None]]:
        await self.wait_for(lambda: len(self.messages) >= n)
        return self.messages


async def wait_until(pred: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


# -- the server ----------------------------------------------------------------


class MotoServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class AwsServer:
    url: str
    moto: MotoServer | None


@pytest.fixture(scope="module")
def aws() -> Iterator[AwsServer]:
    url = os.environ.get("GOCHAN_SQS_URL")
    if url:
        yield AwsServer(url, None)
        return
    try:
        server = MotoServer()
    except (OSError, RuntimeError) as exc:
        broker_unavailable(f"cannot start moto_server (pip install 'moto[server]'): {exc}")
    try:
        yield AwsServer(server.url, server)
    finally:
        server.stop()


def make_driver(server: AwsServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("wait_time", 1)
    kwargs.setdefault("reconnect_max", 0.5)
    return SqsDriver(
        endpoint_url=server.url,
        region=REGION,
        access_key_id=CREDENTIALS["aws_access_key_id"],
        secret_access_key=CREDENTIALS["aws_secret_access_key"],
        **kwargs,
    )


def aws_client(server: AwsServer, service: str) -> Any:
    """An ordinary AWS SDK client (botocore), not the driver."""
    return get_session().create_client(
        service, region_name=REGION, endpoint_url=server.url, **CREDENTIALS
    )


async def subscribed_queues(server: AwsServer, sns_topic_name: str) -> list[str]:
    """Endpoints (queue ARNs) subscribed to an SNS topic, as SNS reports them."""
    async with aws_client(server, "sns") as sns:
        arn = (await sns.create_topic(Name=sns_topic_name))["TopicArn"]
        subs = await sns.list_subscriptions_by_topic(TopicArn=arn)
        return [s["Endpoint"] for s in subs["Subscriptions"]]


async def queue_names(server: AwsServer) -> list[str]:
    async with aws_client(server, "sqs") as client:
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


def test_plain_sns_publish_arrives_unchanged(aws: AwsServer) -> None:
    topic = unique("plain")
    text = "h\u00e9llo\r\nline two\n\U0001f600"

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(aws)
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            async with aws_client(aws, "sns") as sns:
                arn = (await sns.create_topic(Name="gochan-" + topic))["TopicArn"]
                message_id = (await sns.publish(TopicArn=arn, Message=text))["MessageId"]
            await rec.wait_messages(1)
            assert rec.messages == [(topic, text.encode(), message_id)]
        finally:
            await driver.close()

    run(main())


def test_publish_reaches_every_instance_binary_included(aws: AwsServer) -> None:
    topic = unique("fanout")
    bodies = [b"text", b"\x00\xffbinary", b"", "\u20ac".encode()]

    async def main() -> None:
        recs = [Recorder(), Recorder()]
        drivers = [make_driver(aws), make_driver(aws)]
        for d, r in zip(drivers, recs, strict=True):
            await d.connect(r)
        try:
            for d in drivers:
                await d.subscribe(topic)
            ids = [await drivers[i % 2].publish(topic, b) for i, b in enumerate(bodies)]
            expected = sorted(zip([topic] * 4, bodies, ids, strict=True))
            for r in recs:
                await r.wait_messages(len(bodies))
                assert sorted(r.messages) == expected
        finally:
            for d in drivers:
                await d.close()

    run(main())


def test_publish_to_a_topic_nobody_created(aws: AwsServer) -> None:
    async def main() -> None:
        driver = make_driver(aws)
        await driver.connect(Recorder())
        try:
            event_id = await driver.publish(unique("fresh"), b"x")
            assert event_id
            assert driver.stats()["published"] == 1
        finally:
            await driver.close()

    run(main())


def test_subscribe_unsubscribe_open_and_close_the_sns_subscription(aws: AwsServer) -> None:
    t1, t2 = unique("sub-a"), unique("sub-b")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(aws)
        await driver.connect(rec)
        try:
            await driver.subscribe(t1)
            await driver.subscribe(t2)
            assert await subscribed_queues(aws, "gochan-" + t1) == [driver.queue_arn]
            assert driver.stats()["subscriptions"] == 2
            await driver.publish(t1, b"one")
            await rec.wait_messages(1)
            await driver.unsubscribe(t1)
            await driver.unsubscribe(t1)  # harmless twice
            assert await subscribed_queues(aws, "gochan-" + t1) == []
            assert await subscribed_queues(aws, "gochan-" + t2) == [driver.queue_arn]
            await driver.publish(t1, b"after unsubscribe")
            await driver.publish(t2, b"two")
            await rec.wait_messages(2)
            await asyncio.sleep(QUIET_S)
            assert [(t, d) for t, d, _ in rec.messages] == [(t1, b"one"), (t2, b"two")]
        finally:
            await driver.close()

    run(main())


def test_invalid_topic_refused(aws: AwsServer) -> None:
    async def main() -> None:
        driver = make_driver(aws)
        await driver.connect(Recorder())
        try:
            with pytest.raises(InvalidTopicError):
                await driver.subscribe("dots.are.not.sns")
            with pytest.raises(InvalidTopicError):
                await driver.publish("a/b", b"x")
        finally:
            await driver.close()

    run(main())


def test_close_deletes_queue_and_subscriptions(aws: AwsServer) -> None:
    topic = unique("close")

    async def main() -> None:
        driver = make_driver(aws)
        await driver.connect(Recorder())
        await driver.subscribe(topic)
        assert driver.queue_name in await queue_names(aws)
        await driver.close()
        await driver.close()
        assert not driver.ready
        assert driver.queue_name not in await queue_names(aws)
        assert await subscribed_queues(aws, "gochan-" + topic) == []
        with pytest.raises(ClosedError):
            await driver.subscribe(topic)

    run(main())


def test_unreachable_endpoint_fails_promptly() -> None:
    async def main() -> None:
        driver = SqsDriver(
            endpoint_url=f"http://127.0.0.1:{free_port()}",
            timeout=1.0,
            access_key_id="a",
            secret_access_key="b",
        )
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            await driver.connect(Recorder())
        assert time.monotonic() - started < 5
        await driver.close()

    run(main())


def test_server_restart_is_survived(aws: AwsServer) -> None:
    moto = aws.moto
    if moto is None:
        pytest.skip("restarts its own moto_server (GOCHAN_SQS_URL is set)")
    topic, other = unique("restart"), unique("restart-new")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(aws)
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            await driver.publish(topic, b"before")
            await rec.wait_messages(1)
            await asyncio.to_thread(moto.stop)  # moto forgets every queue and topic
            await wait_until(lambda: not driver.ready)
            started = time.monotonic()
            with pytest.raises(BrokerError):
                await driver.subscribe(other)
            with pytest.raises(BrokerError):
                await driver.publish(topic, b"lost")
            assert time.monotonic() - started < 4 * TEST_TIMEOUT_S
            await asyncio.to_thread(moto.start)  # same port, empty state
            await wait_until(lambda: driver.ready)
            assert driver.stats()["reconnects"] == 1
            assert driver.stats()["subscriptions"] == 1
            assert await subscribed_queues(aws, "gochan-" + topic) == [driver.queue_arn]
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
        finally:
            await driver.close()

    run(main())
