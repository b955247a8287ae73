"""Replay that loses nothing with Kafka's durable mode (``log_topic``), on
librdkafka's mock cluster (see ``_kafka_server.py``): a browser resumes from
its Last-Event-ID on the same node, on another gochan process, and on a
restarted one; ids that cannot be honoured get ``recovered:false``."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from gochan.errors import BrokerError
from gochan.server import Server
from tests.support import wait_for

from . import _kafka_server, e2e
from ._kafka_server import KafkaServer
from .conftest import import_or_skip

kafka = import_or_skip("gochan.drivers.kafka")
kafka_log = import_or_skip("gochan.drivers._kafka_log")
import_or_skip("confluent_kafka")

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def server() -> Iterator[KafkaServer]:
    broker = _kafka_server.obtain()
    yield broker
    broker.stop()


def new_log(server: KafkaServer, partitions: int = 1) -> str:
    name = "gochan-log-" + secrets.token_hex(4)
    server.create_topic(name, partitions)
    return name


def options(server: KafkaServer, log: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": server.bootstrap,
        "log_topic": log,
        "timeout": TIMEOUT_S,
        "health_interval": 0.5,
    }


def node(server: KafkaServer, log: str) -> contextlib.AbstractAsyncContextManager[Server]:
    return e2e.serving("kafka", options(server, log))


open_stream = e2e.open_replay_stream
replay_answer = e2e.replay_answer


async def produce(server: KafkaServer, log: str, tag: str, topic: str, data: bytes) -> str:
    """A plain Kafka producer writing to the log, keyed by the gochan topic."""
    partition, offset = await asyncio.to_thread(server.produce, log, data, topic.encode())
    assert partition == 0
    return f"{tag}:{offset}"


async def test_resume_on_the_same_node(server: KafkaServer) -> None:
    log = new_log(server)
    async with node(server, log) as a:
        first = await open_stream(a.port)
        seen = await a.streamer.publish("t1", b"m0")
        assert (await first.event())["id"] == seen
        await first.close()
        missed = [
            ("t2", await a.streamer.publish("t2", b"m1")),
            ("t1", await a.streamer.publish("t1", b"m2")),
        ]
        await a.streamer.publish("elsewhere", b"not for us")
        resumed = await open_stream(a.port, seen)
        assert await replay_answer(resumed) == {"last_event_id": seen, "recovered": True}
        got = [await resumed.event() for _ in missed]
        assert [(e["event"], e["id"]) for e in got] == missed
        assert [e["data"] for e in got] == ["m1", "m2"]
        live = await a.streamer.publish("t1", b"live")
        assert (await resumed.event())["id"] == live
        await resumed.no_frame(0.3)
        await resumed.close()


async def test_resume_on_another_process_and_after_a_restart(server: KafkaServer) -> None:
    log = new_log(server)
    broker = e2e.Broker("kafka", options(server, log), publish=_unused)
    async with node(server, log) as a, e2e.process_node(broker) as b:
        first = await open_stream(a.port)
        await a.streamer.publish("t1", b"m0")
        seen = await first.event()
        assert seen["data"] == "m0"
        tag = seen["id"].partition(":")[0]
        await first.close()
        missed = [  # published through the other gochan process, and by any Kafka client
            ("t1", (await e2e.post_publish(b.port, "t1", b"m1")).json()["id"]),
            ("t2", await produce(server, log, tag, "t2", b"m2")),
            ("t1", (await e2e.post_publish(b.port, "t1", b"m3\nline")).json()["id"]),
        ]
        await e2e.post_publish(b.port, "elsewhere", b"not for us")
        resumed = await open_stream(b.port, seen["id"])
        assert await replay_answer(resumed) == {"last_event_id": seen["id"], "recovered": True}
        got = [await resumed.event() for _ in missed]
        assert [(e["event"], e["id"]) for e in got] == missed
        assert [e["data"] for e in got] == ["m1", "m2", "m3\nline"]
        live = await a.streamer.publish("t2", b"live")
        assert (await resumed.event())["id"] == live
        await resumed.no_frame(0.3)
        last = live
        await resumed.close()
    # Both processes are gone; a new one on the same log takes over.
    after_restart = await produce(server, log, tag, "t1", b"while down")
    async with e2e.process_node(broker) as c:
        resumed = await open_stream(c.port, last)
        assert (await replay_answer(resumed))["recovered"] is True
        event = await resumed.event()
        assert (event["id"], event["data"]) == (after_restart, "while down")
        live = (await e2e.post_publish(c.port, "t2", b"live again")).json()["id"]
        assert (await resumed.event())["id"] == live
        await resumed.close()


async def _unused(topic: str, data: bytes) -> None:
    raise AssertionError("not used here")


async def test_racing_publishes_across_reconnects(server: KafkaServer) -> None:
    from aiokafka import AIOKafkaProducer

    log = new_log(server)
    async with node(server, log) as a, node(server, log) as b:
        producer = AIOKafkaProducer(bootstrap_servers=server.bootstrap)
        await producer.start()
        tag = (await a.streamer.publish("other", b"tag")).partition(":")[0]
        published: list[str] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                key = f"t{1 + i % 2}".encode()
                meta = await producer.send_and_wait(log, b"%d" % i, key=key, partition=0)
                published.append(f"{tag}:{meta.offset}")
                i += 1

        try:
            stream = await open_stream(a.port)
            task = asyncio.create_task(publisher())
            received: list[str] = []
            for hop in range(6):
                while len(received) < 5 * (hop + 1):
                    event = await stream.event()
                    if event["event"] != "message":
                        received.append(event["id"])
                await stream.close()
                stream = await open_stream((b if hop % 2 == 0 else a).port, received[-1])
                assert (await replay_answer(stream))["recovered"] is True
            stop.set()
            await task
            while len(received) < len(published):
                received.append((await stream.event(timeout=10))["id"])
            assert received == published  # each once, in log order, across 6 hand-offs
            await stream.no_frame(0.3)
            await stream.close()
        finally:
            stop.set()
            await producer.stop()


async def test_ids_that_cannot_be_honoured_are_not_recovered(
    server: KafkaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = new_log(server)
    async with node(server, log) as a:
        known = await a.streamer.publish("t1", b"x")
        tag, _, offset = known.partition(":")
        foreign = ("00000000" if tag != "00000000" else "11111111") + ":" + offset
        for last_id in ("999999", "not-a-position", f"{tag}:999999", foreign, f"{tag}:-1"):
            stream = await open_stream(a.port, last_id)
            assert await replay_answer(stream) == {"last_event_id": last_id, "recovered": False}
            live = await a.streamer.publish("t1", b"live")
            assert (await stream.event())["id"] == live  # live delivery still starts
            await stream.close()

        # Retention: the mock cannot truncate a log, so the bounds say it did.
        async def truncated(consumer: Any, tp: Any, timeout_s: float) -> tuple[int, int]:
            end = (await consumer.end_offsets([tp]))[tp]
            return end, end

        monkeypatch.setattr(kafka_log, "log_bounds", truncated)
        stream = await open_stream(a.port, known)
        assert await replay_answer(stream) == {"last_event_id": known, "recovered": False}
        await stream.close()


async def test_a_log_of_several_partitions_is_refused(server: KafkaServer) -> None:
    log = new_log(server, partitions=3)
    driver = kafka.KafkaDriver(bootstrap_servers=server.bootstrap, log_topic=log, timeout=2.0)
    with pytest.raises(BrokerError, match="3 partitions"):
        await driver.connect(_Nothing())
    await driver.close()


class _Nothing:
    def on_message(self, topic: str, data: bytes, event_id: str | None) -> str:
        return event_id or ""

    def on_subscription_failure(self, topic: str, message: str) -> None:
        pass


def test_per_topic_mode_is_not_durable() -> None:
    plain = kafka.KafkaDriver(bootstrap_servers="127.0.0.1:1")
    assert not plain.durable
    assert plain.event_position("0:5") is None
    durable = kafka.KafkaDriver(bootstrap_servers="127.0.0.1:1", log_topic="gochan")
    assert durable.durable
    assert durable.event_position("abc:5") is None  # not connected: no tag yet
    durable.check_topic("any topic/é")  # a record key, not a Kafka topic name
    with pytest.raises(ValueError):
        kafka.KafkaDriver(log_topic="bad/name")


async def test_a_node_whose_live_delivery_lags_sends_nothing_twice(server: KafkaServer) -> None:
    from aiokafka import TopicPartition

    log = new_log(server)
    async with node(server, log) as a, node(server, log) as b:
        consumer = a.streamer.driver._consumer
        tp = TopicPartition(log, 0)
        first = await open_stream(a.port)
        seen = await a.streamer.publish("t1", b"m0")
        assert (await first.event())["id"] == seen
        await first.close()

        # The log has records a has not delivered yet: the replay stops where
        # a's live delivery stands, and live delivery brings the rest once.
        consumer.pause(tp)
        missed = [await b.streamer.publish("t1", b"m1"), await b.streamer.publish("t2", b"m2")]
        resumed = await open_stream(a.port, seen)
        assert (await replay_answer(resumed))["recovered"] is True
        consumer.resume(tp)
        assert [(await resumed.event())["id"] for _ in missed] == missed
        await resumed.no_frame(0.5)
        await resumed.close()

        # The browser comes from b, which is ahead of a: a waits until its
        # live delivery has passed the browser's id, and sends only what follows.
        on_b = await open_stream(b.port, missed[-1])
        assert (await replay_answer(on_b))["recovered"] is True
        consumer.pause(tp)
        ahead = [await b.streamer.publish("t1", b"m3"), await b.streamer.publish("t2", b"m4")]
        assert [(await on_b.event())["id"] for _ in ahead] == ahead
        await on_b.close()
        resumed = await open_stream(a.port, ahead[0])
        asyncio.get_running_loop().call_later(0.3, consumer.resume, tp)
        assert (await replay_answer(resumed))["recovered"] is True
        assert (await resumed.event())["id"] == ahead[1]
        live = await a.streamer.publish("t1", b"live")
        assert (await resumed.event())["id"] == live
        await resumed.no_frame(0.5)
        await resumed.close()


async def test_resume_after_a_broker_outage(server: KafkaServer) -> None:
    mock = server.mock
    if mock is None:
        pytest.skip("needs the mock cluster's down/up switch (GOCHAN_KAFKA_URL is set)")
    log = new_log(server)
    async with node(server, log) as a:
        driver = a.streamer.driver
        first = await open_stream(a.port)
        seen = await a.streamer.publish("t1", b"before")
        assert (await first.event())["id"] == seen
        await first.close()
        await asyncio.to_thread(mock.command, "down")
        try:
            await wait_for(lambda: not driver.ready, 10)
        finally:
            await asyncio.to_thread(mock.command, "up")
        await wait_for(lambda: driver.ready, 10)
        missed = await a.streamer.publish("t2", b"after")
        resumed = await open_stream(a.port, seen)
        assert (await replay_answer(resumed))["recovered"] is True
        assert (await resumed.event())["id"] == missed
        await resumed.no_frame(0.3)
        await resumed.close()
        assert driver.stats()["reconnects"] == 1
