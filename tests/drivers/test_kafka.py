"""KafkaDriver against a real Kafka protocol server.

The broker is librdkafka's mock cluster (see ``_kafka_server.py``), started
once for this module; set ``GOCHAN_KAFKA_URL=host:port`` to use a real broker
instead (the outage test then skips: it needs the mock's down/up switch).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gochan.errors import BrokerConnectionError, BrokerError, ClosedError, InvalidTopicError

from .conftest import broker_unavailable, free_port


def import_or_skip(module: str) -> Any:
    """pytest.importorskip, except that CI (GOCHAN_REQUIRE_BROKERS=1) must have it."""
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


kafka = import_or_skip("gochan.drivers.kafka")
confluent_kafka = import_or_skip("confluent_kafka")
KafkaDriver = kafka.KafkaDriver

SERVER_SCRIPT = Path(__file__).with_name("_kafka_server.py")
SERVER_START_TIMEOUT_S = 20.0
DELIVERY_TIMEOUT_S = 10.0
QUIET_S = 1.0  # how long "nothing arrives" is watched
TEST_TIMEOUT_S = 2.0  # the drivers' own timeout, kept short so failures are fast

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


# -- the broker ------------------------------------------------------------------


class MockKafka:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self._readline(SERVER_START_TIMEOUT_S)
        if not line.startswith("BOOTSTRAP "):
            self.stop()
            raise RuntimeError(f"mock Kafka did not start: {line!r}")
        self.bootstrap = line.split()[1]

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("mock Kafka did not answer")
        return self.proc.stdout.readline().strip()

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self._readline(5.0)
        assert answer == "ok", f"mock Kafka: {cmd!r} -> {answer!r}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class KafkaServer:
    bootstrap: str
    mock: MockKafka | None


@pytest.fixture(scope="module")
def kafka_server() -> Iterator[KafkaServer]:
    url = os.environ.get("GOCHAN_KAFKA_URL")
    if url:
        yield KafkaServer(url.removeprefix("kafka://"), None)
        return
    try:
        mock = MockKafka()
    except (OSError, RuntimeError, TimeoutError) as exc:
        broker_unavailable(f"cannot start librdkafka's mock Kafka cluster: {exc}")
    try:
        yield KafkaServer(mock.bootstrap, mock)
    finally:
        mock.stop()


def make_driver(server: KafkaServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("health_interval", 0.2)
    return KafkaDriver(bootstrap_servers=server.bootstrap, **kwargs)


def plain_produce(server: KafkaServer, ktopic: str, value: bytes) -> tuple[int, int]:
    """Produce with an ordinary Kafka client (librdkafka), not the driver."""
    producer = confluent_kafka.Producer({"bootstrap.servers": server.bootstrap})
    result: list[Any] = []
    producer.produce(ktopic, value, on_delivery=lambda err, msg: result.append((err, msg)))
    producer.flush(DELIVERY_TIMEOUT_S)
    err, msg = result[0]
    assert err is None, err
    return msg.partition(), msg.offset()


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


def test_plain_producer_message_arrives_unchanged(kafka_server: KafkaServer) -> None:
    topic = unique("plain")
    body = b"\x00\xffbinary\r\nlines\n\xe2\x82\xac"

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(kafka_server, prefix="gc-")
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            partition, offset = await asyncio.to_thread(
                plain_produce, kafka_server, "gc-" + topic, body
            )
            await rec.wait_messages(1)
            assert rec.messages == [(topic, body, f"{partition}:{offset}")]
        finally:
            await driver.close()

    run(main())


def test_publish_reaches_every_instance(kafka_server: KafkaServer) -> None:
    topic = unique("fanout")

    async def main() -> None:
        recs = [Recorder(), Recorder()]
        drivers = [make_driver(kafka_server), make_driver(kafka_server)]
        for d, r in zip(drivers, recs, strict=True):
            await d.connect(r)
        try:
            for d in drivers:
                await d.subscribe(topic)
            ids = [await drivers[i % 2].publish(topic, f"m{i}".encode()) for i in range(6)]
            for r in recs:
                await r.wait_messages(6)
                got = sorted(r.messages, key=lambda m: m[1])
                assert got == [(topic, f"m{i}".encode(), ids[i]) for i in range(6)]
            assert drivers[0].stats()["subscriptions"] == 1
        finally:
            for d in drivers:
                await d.close()

    run(main())


def test_subscribe_unsubscribe_changes_the_assignment(kafka_server: KafkaServer) -> None:
    t1, t2 = unique("assign-a"), unique("assign-b")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(kafka_server)
        await driver.connect(rec)
        try:
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
        finally:
            await driver.close()

    run(main())


def test_invalid_topic_refused_before_io(kafka_server: KafkaServer) -> None:
    async def main() -> None:
        driver = make_driver(kafka_server)
        await driver.connect(Recorder())
        try:
            with pytest.raises(InvalidTopicError):
                await driver.subscribe("no/slashes")
            with pytest.raises(InvalidTopicError):
                await driver.publish("no spaces", b"x")
            assert driver.stats()["subscriptions"] == 0
        finally:
            await driver.close()

    run(main())


def test_close_is_idempotent_and_final(kafka_server: KafkaServer) -> None:
    topic = unique("close")

    async def main() -> None:
        driver = make_driver(kafka_server)
        await driver.connect(Recorder())
        await driver.subscribe(topic)
        assert driver.ready
        await driver.close()
        await driver.close()
        assert not driver.ready
        assert driver.stats()["subscriptions"] == 0
        with pytest.raises(ClosedError):
            await driver.subscribe(topic)
        with pytest.raises(ClosedError):
            await driver.publish(topic, b"x")

    run(main())


def test_unreachable_broker_fails_promptly() -> None:
    async def main() -> None:
        driver = KafkaDriver(bootstrap_servers=f"127.0.0.1:{free_port()}", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            await driver.connect(Recorder())
        assert time.monotonic() - started < 5
        assert not driver.ready
        await driver.close()

    run(main())


def test_outage_is_survived(kafka_server: KafkaServer) -> None:
    mock = kafka_server.mock
    if mock is None:
        pytest.skip("needs the mock cluster's down/up switch (GOCHAN_KAFKA_URL is set)")
    topic, other = unique("outage"), unique("outage-new")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(kafka_server)
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            await driver.publish(topic, b"before")
            await rec.wait_messages(1)
            mock.command("down")
            try:
                await wait_until(lambda: not driver.ready)
                started = time.monotonic()
                with pytest.raises(BrokerError):
                    await driver.subscribe(other)
                with pytest.raises(BrokerError):
                    await driver.publish(topic, b"lost")
                assert time.monotonic() - started < 4 * TEST_TIMEOUT_S
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
        finally:
            await driver.close()

    run(main())
