"""RedisDriver against a real redis-server over real sockets.

The broker is ``$GOCHAN_REDIS_URL`` when set, otherwise a redis-server
started here on a free port. Tests that stop, pause or reconfigure the broker
always use a server they started themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from gochan.errors import BrokerConnectionError, BrokerError, ClosedError, ConfigurationError

from . import harness
from ._redis_server import RedisServer, external_url
from .conftest import free_port, import_or_skip
from .harness import BINARY_BODY, DELIVERY_TIMEOUT_S, MULTILINE_BODY, Recorder, unique, wait_until

redis_asyncio = import_or_skip("redis.asyncio")
redis_driver = import_or_skip("gochan.drivers.redis")
redis_streams = import_or_skip("gochan.drivers.redis_streams")
RedisDriver = redis_driver.RedisDriver

RECONNECT_TIMEOUT_S = 15.0
PROMPT_S = 3.0  # "promptly": a refusal must come within this
FAST = {"connect_timeout": 1.0, "command_timeout": 2.0, "reconnect_min": 0.05,
        "reconnect_max": 0.5}  # fmt: skip


# -- helpers -----------------------------------------------------------------


def connected(url: str, **options: Any) -> AbstractAsyncContextManager[tuple[Any, Recorder]]:
    return harness.connected(RedisDriver(url=url, **{**FAST, **options}))


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(url, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


def stream_name(prefix: str) -> str:
    """The one stream key of every topic of a Streams driver with ``prefix``."""
    return prefix + redis_streams.DEFAULT_STREAM_NAME


async def numsub(client: Any, channel: str) -> int:
    [(_name, count)] = await client.pubsub_numsub(channel)
    return int(count)


# -- brokers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = external_url()
    if url is not None:
        yield url
        return
    for server in RedisServer.running():
        yield server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server this test owns: it may be stopped, paused and restarted."""
    yield from RedisServer.running()


# -- mapping and options ---------------------------------------------------------


@pytest.mark.parametrize("topic", ["news", "two words", "orders.*", "a>b", "caf\u00e9", "x" * 256])
def test_every_topic_maps_to_a_channel(topic: str) -> None:
    RedisDriver().check_topic(topic)
    RedisDriver(prefix="gochan:", streams=True).check_topic(topic)


@pytest.mark.parametrize(
    "options",
    [
        {"url": ""},
        {"url": "http://127.0.0.1:6379"},
        {"url": "redis://127.0.0.1:6379/0?protocol=3"},
        {"connect_timeout": 0},
        {"ping_interval": -1},
        {"stream_maxlen": -1},
        {"stream_batch": 0},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RedisDriver(**options)


def test_registry_builds_the_driver() -> None:
    options = {"url": "redis://127.0.0.1:1/0", "prefix": "gochan:"}
    harness.check_registry("redis", options, redis_driver.RedisPubSubDriver)
    streams = redis_streams.RedisStreamsDriver
    harness.check_registry("redis", {**options, "streams": True}, streams)


def test_renamed_and_misplaced_options_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="reconnect_wait_max is now called reconnect_max"):
        RedisDriver(reconnect_wait_max=1.0)
    with pytest.raises(ConfigurationError, match="stream_maxlen is an option of Redis Streams"):
        RedisDriver(stream_maxlen=10)


# -- pub/sub ---------------------------------------------------------------------


async def test_plain_redis_publish_arrives_unchanged(redis_url: str) -> None:
    topic = unique("plain")

    async with (
        connected(redis_url, prefix="gochan:") as (driver, rec),
        raw_client(redis_url) as client,
    ):
        assert driver.ready
        await driver.subscribe(topic)
        bodies = [BINARY_BODY, MULTILINE_BODY, b"", "h\u00e9llo".encode()]
        for body in bodies:
            assert await client.publish("gochan:" + topic, body) == 1
        await client.publish(topic, b"unprefixed: another channel")
        await client.publish("gochan:" + topic, b"last")
        await rec.wait_messages(5)
        assert rec.messages == [(topic, body, None) for body in [*bodies, b"last"]]
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (0, 1)


async def test_driver_publish_reaches_plain_subscribers(redis_url: str) -> None:
    topic = unique("pub") + " with spaces"

    async with (
        connected(redis_url, prefix="app:") as (driver, rec),
        raw_client(redis_url) as client,
    ):
        pubsub = client.pubsub()
        await pubsub.subscribe("app:" + topic)
        await driver.subscribe(topic)
        assert await driver.publish(topic, MULTILINE_BODY) is None
        raw = None
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while raw is None and time.monotonic() < deadline:
            raw = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert raw is not None
        assert raw["channel"] == ("app:" + topic).encode()
        assert raw["data"] == MULTILINE_BODY
        await pubsub.aclose()
        assert await rec.wait_messages(1) == [(topic, MULTILINE_BODY, None)]


async def test_every_process_receives_every_message(redis_url: str) -> None:
    topic = unique("fanout")
    half = 25

    async with (
        connected(redis_url) as (a, rec_a),
        connected(redis_url) as (b, rec_b),
        raw_client(redis_url) as client,
    ):
        await a.subscribe(topic)
        await b.subscribe(topic)
        assert await numsub(client, topic) == 2
        for i in range(half):
            await a.publish(topic, b"a%d" % i)
            await client.publish(topic, b"c%d" % i)
        await rec_a.wait_messages(2 * half)
        await rec_b.wait_messages(2 * half)
        for rec in (rec_a, rec_b):
            bodies = rec.bodies(topic)
            assert len(bodies) == 2 * half
            # per publisher, order is kept
            assert [x for x in bodies if x.startswith(b"a")] == [b"a%d" % i for i in range(half)]
            assert [x for x in bodies if x.startswith(b"c")] == [b"c%d" % i for i in range(half)]


async def test_only_subscribed_topics_are_delivered(redis_url: str) -> None:
    kept, dropped = unique("kept"), unique("dropped")

    async with connected(redis_url) as (driver, rec), raw_client(redis_url) as client:
        await driver.subscribe(kept)
        await driver.subscribe(dropped)
        await driver.unsubscribe(dropped)
        await driver.unsubscribe(dropped)  # harmless twice
        await driver.unsubscribe(unique("never"))
        await client.publish(dropped, b"gone")
        await client.publish(kept, b"sentinel")  # same connection: arrives after
        await rec.wait_messages(1)
        await asyncio.sleep(0.2)
        assert rec.messages == [(kept, b"sentinel", None)]
        assert driver.stats()["subscriptions"] == 1


@pytest.mark.parametrize("streams", [False, True])
async def test_overlapping_subscribe_unsubscribe_leaves_one_subscription(
    redis_url: str, streams: bool
) -> None:
    topic = unique("overlap")
    prefix = unique("gt") + ":"

    async with (
        connected(redis_url, prefix=prefix, streams=streams) as (driver, rec),
        raw_client(redis_url) as client,
    ):
        try:
            first = asyncio.create_task(driver.subscribe(topic))
            await asyncio.sleep(0)  # the first subscribe is on its way
            await driver.unsubscribe(topic)
            await driver.subscribe(topic)
            await first
            if not streams:
                assert await numsub(client, prefix + topic) == 1
            assert driver.stats()["subscriptions"] == 1
            await driver.publish(topic, b"once")
            await rec.wait_messages(1)
            await asyncio.sleep(0.2)
            assert [(t, d) for t, d, _ in rec.messages] == [(topic, b"once")]
        finally:
            await client.delete(prefix + topic)


async def test_subscriptions_seen_from_the_broker(redis_url: str) -> None:
    t1, t2 = unique("seen"), unique("seen")
    name = unique("conn")

    async def subscriber_connections(client: Any) -> list[int]:
        """Channel counts of this driver's connections in subscriber mode."""
        return [
            int(c["sub"])
            for c in await client.client_list()
            if c.get("name") == name and int(c["sub"]) > 0
        ]

    async with (
        connected(redis_url, prefix="p:", name=name) as (driver, _),
        raw_client(redis_url) as client,
    ):
        await driver.subscribe(t1)
        # subscribe() returned after Redis confirmed: no polling needed
        assert await numsub(client, "p:" + t1) == 1
        await driver.subscribe(t1)  # already held: still one
        await driver.subscribe(t2)
        assert await numsub(client, "p:" + t1) == 1
        assert await numsub(client, "p:" + t2) == 1
        # ONE subscriber connection holds every topic
        assert await subscriber_connections(client) == [2]
        await driver.unsubscribe(t1)
        assert await numsub(client, "p:" + t1) == 0
        assert await numsub(client, "p:" + t2) == 1
        await driver.unsubscribe(t2)
        assert await numsub(client, "p:" + t2) == 0
        assert await subscriber_connections(client) == []


async def test_messages_published_right_after_subscribe_are_delivered(redis_url: str) -> None:
    rounds = 50

    async with connected(redis_url) as (driver, rec), raw_client(redis_url) as client:
        topics = [unique("race") for _ in range(rounds)]
        for topic in topics:
            await driver.subscribe(topic)
            await client.publish(topic, topic.encode())
        await rec.wait_messages(rounds)
        assert [t for t, _, _ in rec.messages] == topics


# -- errors and lifecycle ------------------------------------------------------------


async def test_connect_to_nothing_fails_promptly() -> None:
    driver = RedisDriver(url=f"redis://127.0.0.1:{free_port()}/0", **FAST)
    await harness.check_connect_to_nothing(driver, PROMPT_S)


async def test_close_is_idempotent_and_final(redis_url: str) -> None:
    driver = RedisDriver(url=redis_url, **FAST)
    await driver.connect(Recorder())
    await driver.subscribe(unique())
    await driver.close()
    await driver.close()
    assert not driver.ready
    await harness.check_closed(driver, unique())
    with pytest.raises(ClosedError):
        await driver.connect(Recorder())


async def test_broker_restart_is_survived(own_redis: RedisServer) -> None:
    t1, t2 = unique("survive"), unique("survive")

    async with connected(own_redis.url) as (driver, rec):
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        await driver.publish(t1, b"before")
        await rec.wait_messages(1)

        await asyncio.to_thread(own_redis.stop)
        await wait_until(lambda: not driver.ready)
        await harness.check_refused_while_down(
            driver, unique(), t1, PROMPT_S, BrokerConnectionError
        )
        await driver.unsubscribe(t2)  # allowed while down: not restored later
        await asyncio.sleep(0.5)  # a few failed attempts
        assert not driver.ready

        await asyncio.to_thread(own_redis.start)
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (1, 1)
        async with raw_client(own_redis.url) as client:
            assert await numsub(client, t1) == 1
            assert await numsub(client, t2) == 0
            await client.publish(t2, b"unsubscribed")
            await client.publish(t1, b"after")
        await driver.publish(t1, b"via driver")
        await rec.wait_messages(3)
        await asyncio.sleep(0.2)
        assert rec.bodies(t1)[0] == b"before"
        assert sorted(rec.bodies(t1)[1:]) == [b"after", b"via driver"]
        assert rec.bodies(t2) == []
        assert rec.failures == []

        await asyncio.to_thread(own_redis.restart)
        await wait_until(lambda: driver.stats()["reconnects"] == 2, RECONNECT_TIMEOUT_S)
        assert driver.ready


async def test_publish_is_refused_until_the_subscriptions_are_back(
    own_redis: RedisServer,
) -> None:
    """Redis is back but this node's subscriber has not resubscribed yet (it
    waits out its backoff): Redis would drop the message, so the publish is
    refused, not acknowledged and lost; once ready it is delivered."""
    topic = unique("resub")
    slow = {"reconnect_min": 4.0, "reconnect_max": 4.0}
    async with connected(own_redis.url, **slow) as (driver, rec):
        await driver.subscribe(topic)
        await asyncio.to_thread(own_redis.stop)
        await wait_until(lambda: not driver.ready)
        await asyncio.to_thread(own_redis.start)
        assert not driver.ready  # the subscriber's next attempt is 2 s away or more
        with pytest.raises(BrokerConnectionError):
            await driver.publish(topic, b"would be lost")
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        await driver.publish(topic, b"delivered")
        await rec.wait_body(topic, b"delivered")
        assert rec.bodies(topic) == [b"delivered"]


async def test_a_silent_broker_is_detected(own_redis: RedisServer) -> None:
    """A broker that stops answering (not closing) is noticed by PING."""
    topic = unique("silent")

    async with connected(own_redis.url, ping_interval=0.3) as (driver, rec):
        await driver.subscribe(topic)
        own_redis.freeze()
        try:
            await wait_until(lambda: not driver.ready, 5.0)
        finally:
            own_redis.thaw()
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert driver.stats()["reconnects"] >= 1
        async with raw_client(own_redis.url) as client:
            await client.publish(topic, b"awake")
        await rec.wait_messages(1)
        await asyncio.sleep(0.2)
        assert rec.messages == [(topic, b"awake", None)]


async def test_close_while_reconnecting_leaves_nothing_running(own_redis: RedisServer) -> None:
    await harness.check_close_while_reconnecting(
        RedisDriver(url=own_redis.url, **FAST), own_redis.stop
    )


async def test_only_refused_topics_are_reported_after_a_restart(own_redis: RedisServer) -> None:
    allowed, revoked = unique("allowed"), unique("revoked")

    async with connected(own_redis.url) as (driver, rec):
        await driver.subscribe(allowed)
        await driver.subscribe(revoked)
        # from now on the default user may only use channels allowed*
        own_redis.extra_args = ["--user", "default", "on", "nopass", "~*", "resetchannels",
                                "&allowed*", "+@all"]  # fmt: skip
        await asyncio.to_thread(own_redis.restart)
        await rec.wait_for(lambda: bool(rec.failures))
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert [t for t, _ in rec.failures] == [revoked]
        assert "NoPermissionError: this user has no permissions" in rec.failures[0][1]
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (1, 1)
        async with raw_client(own_redis.url) as client:
            assert await numsub(client, allowed) == 1
            await client.publish(allowed, b"yes")
        await rec.wait_messages(1)
        assert rec.messages == [(allowed, b"yes", None)]
        # subscribing to it now is refused at once, and nothing else breaks
        with pytest.raises(BrokerError, match="NoPermissionError"):
            await driver.subscribe(revoked)
        assert driver.ready
        assert driver.stats()["subscriptions"] == 1
        await driver.publish(allowed, b"still")
        await rec.wait_messages(2)


# -- Redis Streams ------------------------------------------------------------------


def test_streams_positions_follow_entry_ids() -> None:
    position = redis_streams.entry_position
    ids = ["0-1", "1-0", "1-1", "1-18446744073709551615", "2-0", "1796167833010-7"]
    positions = [position(i) for i in ids]
    assert positions == sorted(positions) and len(set(positions)) == len(ids)
    for entry_id, pos in zip(ids, positions, strict=True):
        assert redis_streams.position_entry(pos) == entry_id.encode()
    for bad in ("", "12", "1-", "-1", "a-1", "1-2-3", "1-18446744073709551616", " 1-1", "1-1\n"):
        assert position(bad) is None, bad


async def test_streams_ids_are_entry_ids(redis_url: str) -> None:
    """Every topic is in one stream key, in one order: entries carry their
    topic; those for topics not held here, or without both fields, are skipped."""
    t1, t2 = unique("st"), unique("st")
    prefix = unique("gt") + ":"
    key = stream_name(prefix)

    async with (
        connected(redis_url, prefix=prefix, streams=True) as (driver, rec),
        raw_client(redis_url) as client,
    ):
        try:
            before = await client.xadd(key, {"topic": t1, "data": b"before subscribe"})
            await driver.subscribe(t1)
            await driver.subscribe(t2)
            id1 = await driver.publish(t1, BINARY_BODY)
            id2 = (await client.xadd(key, {"topic": t2, "data": MULTILINE_BODY})).decode()
            await client.xadd(key, {"topic": t2, "other": b"no data field"})
            await client.xadd(key, {"data": b"no topic field"})
            await client.xadd(key, {"topic": "not held here", "data": b"x"})
            id3 = await driver.publish(t1, b"")
            await rec.wait_messages(3)
            await asyncio.sleep(0.2)
            assert before.decode() < id1
            assert rec.messages == [
                (t1, BINARY_BODY, id1),
                (t2, MULTILINE_BODY, id2),
                (t1, b"", id3),
            ]
            entries = await client.xrange(key)
            assert entries[-1][1] == {b"topic": t1.encode(), b"data": b""}
            assert driver.event_position(id1) < driver.event_position(id2)
            assert driver.event_position(id2) < driver.event_position(id3)
        finally:
            await client.delete(key)


async def test_streams_new_topics_are_read_at_once(redis_url: str) -> None:
    """The reader blocked in XREAD picks up a new topic without waiting out its block."""
    prefix = unique("gt") + ":"
    first, second = unique("st"), unique("st")

    async with (
        connected(redis_url, prefix=prefix, streams=True, stream_block=30.0) as (driver, rec),
        raw_client(redis_url) as client,
    ):
        try:
            await driver.subscribe(first)
            await asyncio.sleep(0.2)  # the reader is blocked now
            started = time.monotonic()
            await driver.subscribe(second)
            await driver.publish(second, b"quick")
            await rec.wait_messages(1)
            assert time.monotonic() - started < 2.0
            await driver.unsubscribe(second)
            await driver.publish(second, b"unsubscribed")
            await driver.publish(first, b"sentinel")
            await rec.wait_messages(2)
            await asyncio.sleep(0.2)
            assert [(t, d) for t, d, _ in rec.messages] == [
                (second, b"quick"),
                (first, b"sentinel"),
            ]
        finally:
            await client.delete(stream_name(prefix))


async def test_streams_fan_out_and_trim(redis_url: str) -> None:
    prefix = unique("gt") + ":"
    topic = unique("st")

    async with (
        connected(redis_url, prefix=prefix, streams=True, stream_maxlen=5) as (a, rec_a),
        connected(redis_url, prefix=prefix, streams=True) as (b, rec_b),
        raw_client(redis_url) as client,
    ):
        try:
            await a.subscribe(topic)
            await b.subscribe(topic)
            ids = [await a.publish(topic, b"m%d" % i) for i in range(200)]
            await rec_a.wait_messages(200)
            await rec_b.wait_messages(200)
            expected = [(topic, b"m%d" % i, ids[i]) for i in range(200)]
            assert rec_a.messages == expected
            assert rec_b.messages == expected
            assert await client.xlen(stream_name(prefix)) < 200  # trimmed (approximately)
        finally:
            await client.delete(stream_name(prefix))


async def test_streams_refuse_keys_of_another_type(redis_url: str) -> None:
    prefix = unique("gt") + ":"
    key = stream_name(prefix)
    one, two = unique("st"), unique("st")

    async with (
        connected(redis_url, prefix=prefix, streams=True) as (driver, rec),
        raw_client(redis_url) as client,
    ):
        try:
            await client.set(key, b"a string")
            with pytest.raises(BrokerError, match="WRONGTYPE"):
                await driver.subscribe(one)
            await client.delete(key)
            await driver.subscribe(one)
            await driver.subscribe(two)
            # the key is replaced by a string while held: every topic is lost
            await client.set(key, b"a string")
            await rec.wait_for(lambda: len(rec.failures) == 2)
            assert sorted(t for t, _ in rec.failures) == sorted([one, two])
            assert driver.stats()["subscriptions"] == 0
            assert driver.ready
            await client.delete(key)
            await driver.subscribe(one)
            await driver.publish(one, b"flowing again")
            await rec.wait_messages(1)
            assert rec.messages[0][:2] == (one, b"flowing again")
        finally:
            await client.delete(key)


async def test_streams_resume_after_restart_without_gap(own_redis: RedisServer) -> None:
    topic = unique("resume")

    # a slow first retry (1.5 s to 3 s), so the broker is back before the driver is
    slow = {"reconnect_min": 3.0, "reconnect_max": 3.0}
    async with connected(own_redis.url, prefix="g:", streams=True, **slow) as (driver, rec):
        await driver.subscribe(topic)
        first = await driver.publish(topic, b"one")
        await rec.wait_messages(1)
        await asyncio.to_thread(own_redis.stop)
        await wait_until(lambda: not driver.ready)
        await asyncio.to_thread(own_redis.start)  # empty: no persistence
        async with raw_client(own_redis.url) as client:
            entry = {"topic": topic, "data": b"while away"}
            away = (await client.xadd(stream_name("g:"), entry)).decode()
        assert not driver.ready  # added while the driver was away
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        third = await driver.publish(topic, b"three")
        await rec.wait_messages(3)
        await asyncio.sleep(0.2)
        assert rec.messages == [
            (topic, b"one", first),
            (topic, b"while away", away),
            (topic, b"three", third),
        ]
        assert driver.stats()["reconnects"] == 1
        assert rec.failures == []
