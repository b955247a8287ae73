"""NatsDriver against a real nats-server over real sockets.

The broker is ``$GOCHAN_NATS_URL`` when set (it must have JetStream enabled
for the JetStream tests), otherwise a nats-server started here on free ports.
Tests that look at the broker's side (monitoring endpoint) or stop and
restart it always use a server they started themselves.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gochan.errors import (
    BrokerConnectionError,
    BrokerError,
    ClosedError,
    ConfigurationError,
    InvalidTopicError,
)

from . import harness
from ._nats_server import NatsServer, external_url
from .conftest import broker_unavailable, free_port, import_or_skip
from .harness import (
    BINARY_BODY,
    DELIVERY_TIMEOUT_S,
    MULTILINE_BODY,
    Recorder,
    unique,
    wait_until,
)

nats = import_or_skip("nats")
nats_driver = import_or_skip("gochan.drivers.nats")
nats_client = import_or_skip("gochan.drivers._nats_client")
NatsDriver = nats_driver.NatsDriver

RECONNECT_TIMEOUT_S = 15.0
PROMPT_S = 3.0  # "promptly": a refusal must come within this
FAST = {"connect_timeout": 1.0, "request_timeout": 2.0, "reconnect_min": 0.05,
        "reconnect_max": 0.5}  # fmt: skip

_T = TypeVar("_T")


# -- helpers -----------------------------------------------------------------


async def poll(fn: Callable[[], _T], pred: Callable[[_T], bool], timeout: float = 10.0) -> _T:
    """Call blocking ``fn`` in a thread until ``pred`` holds for its result."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(fn)
        if pred(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"last value: {value!r}")
        await asyncio.sleep(0.05)


def connected(url: str, **options: Any) -> AbstractAsyncContextManager[tuple[Any, Recorder]]:
    return harness.connected(NatsDriver(url=url, **{**FAST, **options}))


@asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        yield nc
    finally:
        await nc.close()


# -- brokers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    url = external_url()
    if url is not None:
        yield url
        return
    for server in NatsServer.running():
        yield server.url


@pytest.fixture
def own_nats() -> Iterator[NatsServer]:
    """A server this test owns: it may be inspected, stopped and restarted."""
    yield from NatsServer.running()


# -- topic mapping ---------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["news", "orders.eu.paris", "a-b_c:d/e", "caf\u00e9", "\u65b0\u95fb", "x" * 256, "5$"],
)
def test_check_topic_accepts_literal_subjects(topic: str) -> None:
    NatsDriver().check_topic(topic)
    NatsDriver(prefix="gochan.").check_topic(topic)


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("two words", "whitespace"),
        ("tab\there", "whitespace"),
        ("nbsp\u00a0here", "whitespace"),
        ("line\nbreak", "whitespace"),
        ("nul\x00", "control"),
        ("del\x7f", "control"),
        ("unit\x1fseparator", "whitespace"),
        ("*", "wildcard"),
        ("orders.*", "wildcard"),
        ("orders.>", "wildcard"),
        ("star*inside", "wildcard"),
        (">", "wildcard"),
        (".leading", "empty"),
        ("trailing.", "empty"),
        ("double..dot", "empty"),
        (".", "empty"),
        ("", "empty"),
    ],
)
def test_check_topic_refuses_unmappable(topic: str, reason: str) -> None:
    for driver in (NatsDriver(), NatsDriver(prefix="gochan.")):
        with pytest.raises(InvalidTopicError) as info:
            driver.check_topic(topic)
        assert info.value.topic == topic
        assert reason in info.value.reason


def rule_by_rule(subject: str) -> str | None:
    """The subject rules, one character at a time: what subject_problem's
    regex scan must agree with."""
    for ch in subject:
        if ch.isspace():
            return "NATS subjects cannot contain whitespace"
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return "NATS subjects cannot contain control characters"
        if ch in "*>":
            return f"{ch!r} is a NATS wildcard"
    if "" in subject.split("."):
        return "'.' separates NATS subject tokens, which cannot be empty"
    return None


@given(
    st.text(
        st.characters(codec="utf-8") | st.sampled_from(" .*>\x00\x1f\x7f\x85\t\u00a0\u2028\u3000"),
        max_size=24,
    )
)
def test_subject_problem_follows_the_rules_character_by_character(subject: str) -> None:
    assert nats_client.subject_problem(subject) == rule_by_rule(subject)


def test_subject_problem_judges_every_character_as_the_rules_do() -> None:
    """Each character up to U+3000 (every whitespace character is in that
    range) alone between two letters: random text seldom has one odd
    character without another before it."""
    for code in range(0x3001):
        if 0xD800 <= code <= 0xDFFF:
            continue  # surrogates: never in a decoded topic
        subject = f"a{chr(code)}b"
        assert nats_client.subject_problem(subject) == rule_by_rule(subject), hex(code)


def test_dollar_subjects_reserved_without_prefix() -> None:
    with pytest.raises(InvalidTopicError, match="reserved"):
        NatsDriver().check_topic("$SYS.REQ.SERVER.PING")
    NatsDriver(prefix="gochan.").check_topic("$SYS")  # gochan.$SYS is an ordinary subject


@pytest.mark.parametrize(
    "options",
    [
        {"prefix": "gochan"},  # must end with '.'
        {"prefix": "go chan."},
        {"prefix": "gochan.*."},
        {"prefix": ".gochan."},
        {"jetstream": True},  # needs a prefix
        {"jetstream": True, "prefix": "g.", "stream": "BAD.NAME"},
        {"connect_timeout": 0},
        {"url": ""},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        NatsDriver(**options)


def test_registry_builds_the_driver() -> None:
    options = {"url": "nats://127.0.0.1:1", "prefix": "gochan."}
    harness.check_registry("nats", options, NatsDriver)


# -- core pub/sub ------------------------------------------------------------------


async def test_plain_nats_publish_arrives_unchanged(nats_url: str) -> None:
    topic = unique("plain")

    async with connected(nats_url) as (driver, rec), raw_client(nats_url) as nc:
        assert driver.ready
        await driver.subscribe(topic)
        for body in (BINARY_BODY, MULTILINE_BODY, b"", "h\u00e9llo".encode()):
            await nc.publish(topic, body)
        await nc.flush()
        await rec.wait_messages(4)
        assert rec.messages == [
            (topic, BINARY_BODY, None),
            (topic, MULTILINE_BODY, None),
            (topic, b"", None),
            (topic, "h\u00e9llo".encode(), None),
        ]
        assert driver.stats()["subscriptions"] == 1


async def test_driver_publish_uses_the_prefixed_subject(nats_url: str) -> None:
    topic = unique("pub") + ".eu"

    got: asyncio.Queue[Any] = asyncio.Queue()
    async with (
        connected(nats_url, prefix="gochan.") as (driver, rec),
        raw_client(nats_url) as nc,
    ):

        async def on_raw(msg: Any) -> None:
            await got.put(msg)

        await nc.subscribe("gochan." + topic, cb=on_raw)
        await nc.flush()
        await driver.subscribe(topic)
        assert await driver.publish(topic, MULTILINE_BODY) is None
        raw = await asyncio.wait_for(got.get(), DELIVERY_TIMEOUT_S)
        assert raw.subject == "gochan." + topic
        assert raw.data == MULTILINE_BODY
        assert await rec.wait_messages(1) == [(topic, MULTILINE_BODY, None)]
        # the unprefixed subject is another subject altogether
        await nc.publish(topic, b"not for gochan")
        await nc.publish("gochan." + topic, b"for gochan")
        await nc.flush()
        await rec.wait_messages(2)
        assert rec.bodies(topic) == [MULTILINE_BODY, b"for gochan"]


async def test_every_process_receives_every_message(nats_url: str) -> None:
    topic = unique("fanout")
    count = 50

    async with (
        connected(nats_url) as (a, rec_a),
        connected(nats_url) as (b, rec_b),
        raw_client(nats_url) as nc,
    ):
        await a.subscribe(topic)
        await b.subscribe(topic)
        for i in range(count // 2):
            await a.publish(topic, b"a%d" % i)
            await nc.publish(topic, b"n%d" % i)
        await nc.flush()
        await rec_a.wait_messages(count)
        await rec_b.wait_messages(count)
        for rec in (rec_a, rec_b):
            bodies = rec.bodies(topic)
            assert sorted(bodies) == sorted(
                [b"a%d" % i for i in range(count // 2)] + [b"n%d" % i for i in range(count // 2)]
            )
            # per publisher, order is kept
            assert [x for x in bodies if x.startswith(b"n")] == [
                b"n%d" % i for i in range(count // 2)
            ]


async def test_only_subscribed_topics_are_delivered(nats_url: str) -> None:
    kept, dropped = unique("kept"), unique("dropped")

    async with connected(nats_url) as (driver, rec), raw_client(nats_url) as nc:
        await driver.subscribe(kept)
        await driver.subscribe(dropped)
        await driver.unsubscribe(dropped)
        await driver.unsubscribe(dropped)  # harmless twice
        await nc.publish(dropped, b"gone")
        await nc.publish("other." + kept, b"other subject")
        await nc.publish(kept, b"sentinel")  # same publisher: arrives after the others
        await nc.flush()
        await rec.wait_messages(1)
        await asyncio.sleep(0.2)
        assert rec.messages == [(kept, b"sentinel", None)]
        assert driver.stats()["subscriptions"] == 1


async def test_messages_published_right_after_subscribe_are_delivered(nats_url: str) -> None:
    """subscribe() returns only once the server has the subscription."""
    rounds = 50

    async with connected(nats_url) as (driver, rec), raw_client(nats_url) as nc:
        topics = [unique("race") for _ in range(rounds)]
        for topic in topics:
            await driver.subscribe(topic)
            await nc.publish(topic, topic.encode())
            await nc.flush()
        await rec.wait_messages(rounds)
        assert [t for t, _, _ in rec.messages] == topics


async def test_overlapping_subscribe_unsubscribe_leaves_one_subscription(
    own_nats: NatsServer,
) -> None:
    topic = unique("overlap")

    async with connected(own_nats.url, name="overlap") as (driver, rec):
        first = asyncio.create_task(driver.subscribe(topic))
        await asyncio.sleep(0)  # the first subscribe is on its way
        await driver.unsubscribe(topic)
        await driver.subscribe(topic)
        await first
        assert await asyncio.to_thread(own_nats.subscriptions, "overlap") == [topic]
        assert driver.stats()["subscriptions"] == 1
        await driver.publish(topic, b"once")
        await rec.wait_messages(1)
        await asyncio.sleep(0.2)
        assert rec.messages == [(topic, b"once", None)]


async def test_subscriptions_seen_from_the_broker(own_nats: NatsServer) -> None:
    name = unique("gochan-conn")
    t1, t2 = unique("seen"), unique("seen") + ".sub"

    def subjects() -> list[str]:
        return sorted(own_nats.subscriptions(name))

    async with connected(own_nats.url, name=name, prefix="app.") as (driver, _rec):
        assert await poll(subjects, lambda s: s == []) == []
        await driver.subscribe(t1)
        # subscribe() returned after the server confirmed: no polling needed
        assert await asyncio.to_thread(subjects) == ["app." + t1]
        await driver.subscribe(t2)
        assert await asyncio.to_thread(subjects) == sorted(["app." + t1, "app." + t2])
        await driver.unsubscribe(t1)
        assert await poll(subjects, lambda s: len(s) == 1) == ["app." + t2]
        await driver.unsubscribe(t2)
        assert await poll(subjects, lambda s: s == []) == []


async def test_core_messages_come_in_order_with_no_task_per_topic(own_nats: NatsServer) -> None:
    topics = [unique("direct") for _ in range(20)]
    async with connected(own_nats.url) as (driver, rec):
        tasks = len(asyncio.all_tasks())
        for topic in topics:
            await driver.subscribe(topic)
        # nats-py would run one task per subscription; DirectClient none.
        assert len(asyncio.all_tasks()) <= tasks + 1
        async with raw_client(own_nats.url) as nc:
            for n in range(400):
                await nc.publish(topics[n % 20], b"%d" % n)
            await nc.flush()
        await rec.wait_messages(400)
        for i, topic in enumerate(topics):
            assert rec.bodies(topic) == [b"%d" % n for n in range(i, 400, 20)]
        await driver.unsubscribe(topics[0])
        async with raw_client(own_nats.url) as nc:
            await nc.publish(topics[0], b"after")
            await nc.publish(topics[1], b"after")
            await nc.flush()
        await rec.wait_body(topics[1], b"after")
        assert b"after" not in rec.bodies(topics[0])


def count_pings(driver: Any) -> list[int]:
    """A one-item list counting the PINGs the driver's connection writes."""
    nc, count = driver._nc, [0]
    ping = nc.ping

    def counted() -> Any:
        count[0] += 1
        return ping()

    nc.ping = counted
    return count


async def test_core_subscriptions_hold_no_nats_py_subscription(own_nats: NatsServer) -> None:
    """A core topic costs a sid and a function, not nats-py's Subscription
    with its two asyncio queues (4 KiB, most of an idle connection's memory
    with per-user topics)."""
    name = unique("light")
    topics = [unique("light") for _ in range(20)]
    async with connected(own_nats.url, name=name) as (driver, rec):
        held_by_nats_py = len(driver._nc._subs)
        for topic in topics:
            await driver.subscribe(topic)
        assert len(driver._nc._subs) == held_by_nats_py
        assert sorted(await asyncio.to_thread(own_nats.subscriptions, name)) == sorted(topics)
        for topic in topics[:10]:
            await driver.unsubscribe(topic)
        assert sorted(await poll(lambda: own_nats.subscriptions(name), lambda s: len(s) == 10)) == (
            sorted(topics[10:])
        )
        async with raw_client(own_nats.url) as nc:
            for topic in topics:
                await nc.publish(topic, topic.encode())
            await nc.flush()
        await rec.wait_messages(10)
        await asyncio.sleep(0.2)
        assert sorted(t for t, _, _ in rec.messages) == sorted(topics[10:])


async def test_subscribes_made_together_share_one_round_trip(own_nats: NatsServer) -> None:
    name = unique("together")
    topics = [unique("together") for _ in range(200)]
    async with connected(own_nats.url, name=name) as (driver, _rec):
        pings = count_pings(driver)
        await asyncio.gather(*(driver.subscribe(t) for t in topics))
        assert pings[0] == 1
        # Each returned once the server had its SUB: no polling needed.
        assert len(await asyncio.to_thread(own_nats.subscriptions, name)) == 200


async def test_round_trips_asked_for_while_two_are_unanswered_wait_for_one(
    own_nats: NatsServer,
) -> None:
    """A group commit: two round trips may be under way; while they are
    unanswered, every caller that comes joins a third, which starts when the
    first ends."""
    name = unique("group")
    first, *later = [unique("group") for _ in range(50)]
    async with connected(own_nats.url, name=name) as (driver, _rec):
        pings = count_pings(driver)
        own_nats.freeze()
        try:
            tasks = [asyncio.create_task(driver.subscribe(first))]
            await wait_until(lambda: pings[0] == 1, PROMPT_S)
            for topic in later:  # one per loop pass, all while the first waits
                tasks.append(asyncio.create_task(driver.subscribe(topic)))
                await asyncio.sleep(0)
        finally:
            own_nats.thaw()
        await asyncio.gather(*tasks)
        assert pings[0] == 3
        assert len(await asyncio.to_thread(own_nats.subscriptions, name)) == 50


async def test_a_caller_cancelled_in_a_shared_round_trip_leaves_it_to_the_others(
    own_nats: NatsServer,
) -> None:
    name = unique("cancelled")
    gone, kept = unique("cancelled"), unique("cancelled")
    async with connected(own_nats.url, name=name) as (driver, rec):
        leaving = asyncio.create_task(driver.subscribe(gone))
        staying = asyncio.create_task(driver.subscribe(kept))
        await asyncio.sleep(0)  # both queued their SUB and wait for one PONG
        leaving.cancel()
        await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await poll(lambda: own_nats.subscriptions(name), lambda s: s == [kept]) == [kept]
        async with raw_client(own_nats.url) as nc:
            await nc.publish(gone, b"not held")
            await nc.publish(kept, b"held")
            await nc.flush()
        await rec.wait_body(kept, b"held")
        assert rec.bodies(gone) == []


async def test_two_processes_hold_one_subscription_each(own_nats: NatsServer) -> None:
    topic = unique("one-each")

    async with (
        connected(own_nats.url, name="node-a") as (a, _),
        connected(own_nats.url, name="node-b") as (b, _),
    ):
        await a.subscribe(topic)
        await b.subscribe(topic)
        subsz = await asyncio.to_thread(own_nats.monitor, "/subsz?subs=1")
        on_topic = [s for s in subsz.get("subscriptions_list") or [] if s["subject"] == topic]
        assert len(on_topic) == 2
        assert all(not s.get("qgroup") for s in on_topic)  # never a queue group


# -- errors and lifecycle ------------------------------------------------------------


async def test_connect_to_nothing_fails_promptly() -> None:
    driver = NatsDriver(url=f"nats://127.0.0.1:{free_port()}", **FAST)
    await harness.check_connect_to_nothing(driver, PROMPT_S)


async def test_close_is_idempotent_and_final(nats_url: str) -> None:
    driver = NatsDriver(url=nats_url, **FAST)
    await driver.connect(Recorder())
    await driver.subscribe(unique())
    await driver.close()
    await driver.close()
    assert not driver.ready
    await harness.check_closed(driver, unique())
    with pytest.raises(ClosedError):
        await driver.connect(Recorder())


async def test_invalid_topics_refused_by_subscribe_and_publish(nats_url: str) -> None:
    async with connected(nats_url) as (driver, _):
        with pytest.raises(InvalidTopicError):
            await driver.subscribe("a b")
        with pytest.raises(InvalidTopicError):
            await driver.publish("news.*", b"x")
        assert driver.stats()["subscriptions"] == 0


async def test_oversized_message_is_a_broker_error(nats_url: str) -> None:
    async with connected(nats_url) as (driver, _):
        with pytest.raises(BrokerError, match="max_payload"):
            await driver.publish(unique(), b"x" * (64 * 1024 * 1024))
        assert driver.ready  # the connection survives


async def test_broker_restart_is_survived(own_nats: NatsServer) -> None:
    t1, t2 = unique("survive"), unique("survive")

    async with connected(own_nats.url) as (driver, rec):
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        await driver.publish(t1, b"before")
        await rec.wait_messages(1)
        assert driver.stats()["reconnects"] == 0

        await asyncio.to_thread(own_nats.stop)
        await wait_until(lambda: not driver.ready)
        await harness.check_refused_while_down(
            driver, unique(), t1, PROMPT_S, BrokerConnectionError
        )
        await driver.unsubscribe(t2)  # allowed while down: not restored later
        await asyncio.sleep(0.5)  # a few failed attempts
        assert not driver.ready

        await asyncio.to_thread(own_nats.start)
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (1, 1)
        assert sorted(own_nats.subscriptions("gochan")) == [t1]
        async with raw_client(own_nats.url) as nc:
            await nc.publish(t1, b"after")
            await nc.publish(t2, b"unsubscribed")
            await nc.flush()
        await driver.publish(t1, b"via driver")
        await rec.wait_messages(3)
        await asyncio.sleep(0.2)
        # two publishers: NATS orders each one's messages, not the mix
        assert rec.bodies(t1)[0] == b"before"
        assert sorted(rec.bodies(t1)[1:]) == [b"after", b"via driver"]
        assert rec.bodies(t2) == []
        assert rec.failures == []

        # and a second outage is counted too
        await asyncio.to_thread(own_nats.restart)
        await wait_until(lambda: driver.stats()["reconnects"] == 2, RECONNECT_TIMEOUT_S)
        assert driver.ready


async def test_a_silent_broker_is_detected(own_nats: NatsServer) -> None:
    """A broker that stops answering (not closing) is noticed by the pings."""
    topic = unique("silent")

    async with connected(own_nats.url, ping_interval=1.0) as (driver, rec):
        await driver.subscribe(topic)
        own_nats.freeze()
        try:
            await wait_until(lambda: not driver.ready, 10.0)
        finally:
            own_nats.thaw()
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert driver.stats()["reconnects"] >= 1
        async with raw_client(own_nats.url) as nc:
            await nc.publish(topic, b"awake")
            await nc.flush()
        await rec.wait_messages(1)
        await asyncio.sleep(0.2)
        assert rec.messages == [(topic, b"awake", None)]


async def test_a_publish_unanswered_by_a_frozen_broker_replaces_the_connection(
    own_nats: NatsServer,
) -> None:
    """A broker frozen past the request timeout: the publish is refused, the
    driver says it is not ready and refuses at once, and once the broker
    resumes a NEW connection delivers again. A publish whose round trip was
    queued behind the one that timed out fails with it, not a timeout later."""
    topic = unique("frozen")
    async with connected(own_nats.url, request_timeout=1.0) as (driver, rec):
        await driver.subscribe(topic)
        own_nats.freeze()
        try:
            # Two round trips under way (the most allowed), a third queued
            # behind the first, which times out first.
            unanswered = asyncio.create_task(driver.publish(topic, b"unanswered"))
            await asyncio.sleep(0.5)
            second = asyncio.create_task(driver.publish(topic, b"second"))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(driver.publish(topic, b"queued"))
            with pytest.raises(BrokerConnectionError):
                await unanswered
            failed_at = time.monotonic()
            with pytest.raises(BrokerConnectionError):
                await queued
            assert time.monotonic() - failed_at < 0.2  # not the 0.5 s of the second's
            with pytest.raises(BrokerConnectionError):
                await second
            assert not driver.ready
            started = time.monotonic()
            with pytest.raises(BrokerConnectionError):
                await driver.publish(topic, b"refused")
            assert time.monotonic() - started < 0.1
        finally:
            own_nats.thaw()
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert driver.stats()["reconnects"] == 1
        await driver.publish(topic, b"after")
        await rec.wait_body(topic, b"after")
        async with raw_client(own_nats.url) as nc:
            await nc.publish(topic, b"from another client")
            await nc.flush()
        await rec.wait_body(topic, b"from another client")


def test_the_nats_py_internals_the_driver_uses_are_there() -> None:
    """The driver reaches into nats-py in two places. DirectClient makes
    core subscriptions without nats-py's Subscription: it numbers them with
    ``Client._sid``, queues SUB and UNSUB with ``_send_command``, gets each
    MSG from the parser through ``Client._process_msg`` by sid, and its
    ``ping`` writes the ``_pending`` buffer and a PING on ``_transport`` and
    registers the PONG's future in ``_pongs``, as ``_send_ping`` does, for
    ``_process_pong`` to resolve in order. And a JetStream subscription's
    ``_sub._jsi._hbtask``/``_fctask`` are cancelled to stop its heartbeat
    tasks. When nats-py moves them this fails, and pyproject.toml's upper
    bound keeps users on a version where they are."""
    import inspect

    from nats.aio.client import Client
    from nats.js.client import JetStreamContext
    from nats.protocol import parser

    assert "nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(parser)
    assert list(inspect.signature(Client._process_msg).parameters) == [
        "self", "sid", "subject", "reply", "data", "headers",
    ]  # fmt: skip
    init = inspect.getsource(Client.__init__)
    for attr in ("_sid", "_pending", "_pending_data_size", "_pongs", "_transport"):
        assert f"self.{attr}:" in init, attr
    assert "self._sid += 1" in inspect.getsource(Client.subscribe)
    assert "self._pending.append(cmd)" in inspect.getsource(Client._send_command)
    flusher = inspect.getsource(Client._flusher)
    assert "self._transport.writelines(self._pending[:])" in flusher
    ping = inspect.getsource(Client._send_ping)
    assert "self._pongs.append(future)" in ping and "self._transport.write(" in ping
    pong = inspect.getsource(Client._process_pong)
    assert "self._pongs.pop(0)" in pong and "set_result(True)" in pong
    jsi = inspect.getsource(JetStreamContext._JSI)
    assert "self._hbtask" in jsi and "self._fctask" in jsi
    assert "self._sub._jsi" in inspect.getsource(JetStreamContext)


async def test_close_while_reconnecting_leaves_nothing_running(own_nats: NatsServer) -> None:
    await harness.check_close_while_reconnecting(
        NatsDriver(url=own_nats.url, **FAST), own_nats.stop
    )


PERMISSIONS = """
authorization {{
  users = [
    {{ user: "gochan", password: "s3cret", permissions: {{ subscribe: {{ deny: [{deny}] }} }} }}
  ]
}}
"""


async def test_only_refused_topics_are_reported_after_a_restart(own_nats: NatsServer) -> None:
    allowed, revoked = unique("allowed"), unique("revoked")
    own_nats.user, own_nats.password = "gochan", "s3cret"
    own_nats.set_config(PERMISSIONS.format(deny='"nothing"'))
    own_nats.restart()

    async with connected(own_nats.url) as (driver, rec):
        await driver.subscribe(allowed)
        await driver.subscribe(revoked)
        own_nats.set_config(PERMISSIONS.format(deny=f'"{revoked}"'))
        await asyncio.to_thread(own_nats.restart)
        await rec.wait_for(lambda: bool(rec.failures))
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        assert [t for t, _ in rec.failures] == [revoked]
        assert "permissions violation" in rec.failures[0][1].lower()
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (1, 1)
        async with raw_client(own_nats.url) as nc:
            await nc.publish(revoked, b"no")
            await nc.publish(allowed, b"yes")
            await nc.flush()
        await rec.wait_messages(1)
        assert rec.messages == [(allowed, b"yes", None)]
        # subscribing to it now is refused at once
        with pytest.raises(BrokerError, match=r"(?i)permissions violation"):
            await driver.subscribe(revoked)
        assert driver.stats()["subscriptions"] == 1


# -- JetStream -------------------------------------------------------------------------


@asynccontextmanager
async def jetstream(url: str, **options: Any) -> AsyncIterator[tuple[Any, Recorder, str, str]]:
    """A JetStream driver with its own prefix and stream (deleted afterwards)."""
    tag = uuid.uuid4().hex[:10]
    prefix, stream = f"gt{tag}.", f"GT{tag}"
    try:
        async with connected(url, jetstream=True, prefix=prefix, stream=stream, **options) as (
            driver,
            rec,
        ):
            yield driver, rec, prefix, stream
    except BrokerError as exc:
        if "JetStream is not enabled" in str(exc):
            broker_unavailable(f"JetStream is not enabled on {url}")
        raise
    finally:
        async with raw_client(url) as nc:
            with suppress(Exception):
                await nc.jetstream().delete_stream(stream)


async def test_jetstream_ids_are_stream_sequences(nats_url: str) -> None:
    t1, t2 = unique("js"), unique("js")

    async with jetstream(nats_url) as (driver, rec, prefix, stream), raw_client(nats_url) as nc:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        assert info.config.subjects == [prefix + ">"]
        before = await js.publish(prefix + t1, b"before subscribe")
        await driver.subscribe(t1)
        await driver.subscribe(t2)
        id1 = await driver.publish(t1, BINARY_BODY)
        ack = await js.publish(prefix + t2, MULTILINE_BODY)
        id3 = await driver.publish(t1, b"")
        await rec.wait_messages(3)
        assert id1 == str(before.seq + 1)
        assert id3 == str(ack.seq + 1)
        assert sorted(rec.messages, key=lambda m: int(m[2] or 0)) == [
            (t1, BINARY_BODY, id1),
            (t2, MULTILINE_BODY, str(ack.seq)),
            (t1, b"", id3),
        ]
        # core NATS publishers reach it too: the stream captures the subject
        await nc.publish(prefix + t2, b"core")
        await nc.flush()
        await rec.wait_messages(4)
        assert rec.messages[-1][:2] == (t2, b"core")
        assert rec.messages[-1][2] == str(ack.seq + 2)


async def test_jetstream_fan_out_and_unsubscribe(nats_url: str) -> None:
    topic = unique("jsfan")

    async with (
        jetstream(nats_url) as (a, rec_a, prefix, stream),
        connected(nats_url, jetstream=True, prefix=prefix, stream=stream) as (b, rec_b),
    ):
        await a.subscribe(topic)
        await b.subscribe(topic)
        ids = [await a.publish(topic, b"m%d" % i) for i in range(10)]
        await rec_a.wait_messages(10)
        await rec_b.wait_messages(10)
        expected = [(topic, b"m%d" % i, ids[i]) for i in range(10)]
        assert rec_a.messages == expected
        assert rec_b.messages == expected
        await b.unsubscribe(topic)
        await a.publish(topic, b"only a")
        await rec_a.wait_messages(11)
        await asyncio.sleep(0.3)
        assert len(rec_b.messages) == 10


async def test_jetstream_resumes_after_restart_without_gap(own_nats: NatsServer) -> None:
    topic = unique("jsresume")

    # a slow first retry (1.5 s to 3 s), so the broker is back before the driver is
    slow = {"reconnect_min": 3.0, "reconnect_max": 3.0}
    async with jetstream(own_nats.url, **slow) as (driver, rec, prefix, _stream):
        await driver.subscribe(topic)
        first = await driver.publish(topic, b"one")
        await rec.wait_messages(1)
        await asyncio.to_thread(own_nats.stop)
        await wait_until(lambda: not driver.ready)
        await asyncio.to_thread(own_nats.start)
        async with raw_client(own_nats.url) as nc:
            ack = await nc.jetstream().publish(prefix + topic, b"while away")
        assert not driver.ready  # stored while the driver was away
        await wait_until(lambda: driver.ready, RECONNECT_TIMEOUT_S)
        third = await driver.publish(topic, b"three")
        await rec.wait_messages(3)
        await asyncio.sleep(0.2)
        assert rec.messages == [
            (topic, b"one", first),
            (topic, b"while away", str(ack.seq)),
            (topic, b"three", third),
        ]
        assert driver.stats()["reconnects"] == 1
        assert rec.failures == []


async def test_jetstream_missing_stream_without_create(nats_url: str) -> None:
    driver = NatsDriver(
        url=nats_url, jetstream=True, prefix="gtnone.", stream=unique("NONE"),
        create_stream=False, **FAST,
    )  # fmt: skip
    with pytest.raises(BrokerError, match=r"does not exist|not enabled"):
        await driver.connect(Recorder())
    await driver.close()


async def test_a_subscription_revoked_while_held_is_reported(own_nats: NatsServer) -> None:
    kept, revoked = unique("kept"), unique("revoked")
    own_nats.user, own_nats.password = "gochan", "s3cret"
    own_nats.set_config(PERMISSIONS.format(deny='"nothing"'))
    own_nats.restart()

    async with connected(own_nats.url) as (driver, rec):
        await driver.subscribe(kept)
        await driver.subscribe(revoked)
        own_nats.set_config(PERMISSIONS.format(deny=f'"{revoked}"'))
        assert own_nats.proc is not None
        own_nats.proc.send_signal(signal.SIGHUP)  # reload the configuration
        await rec.wait_for(lambda: bool(rec.failures))
        assert [t for t, _ in rec.failures] == [revoked]
        assert driver.ready
        assert (driver.stats()["reconnects"], driver.stats()["subscriptions"]) == (0, 1)


def test_renamed_reconnect_options_name_the_new_ones() -> None:
    with pytest.raises(ConfigurationError, match="reconnect_wait is now called reconnect_min"):
        NatsDriver(reconnect_wait=0.5)
    with pytest.raises(ConfigurationError, match="reconnect_max must not be below reconnect_min"):
        NatsDriver(reconnect_min=2.0, reconnect_max=1.0)
