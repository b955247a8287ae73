"""PubSubDriver against the Google Cloud Pub/Sub emulator on a free loopback port.

The emulator comes with the Google Cloud CLI (``cloud-pubsub-emulator`` under
the SDK's ``platform/pubsub-emulator``; it needs Java). Set
``GOCHAN_PUBSUB_EMULATOR_HOST=host:port`` to use a running one instead; the
restart test then skips, since it restarts its own emulator.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import pytest

from gochan.errors import BrokerConnectionError, BrokerError, ClosedError, InvalidTopicError

from .conftest import broker_unavailable, free_port, port_open


def import_or_skip(module: str) -> Any:
    """pytest.importorskip, except that CI (GOCHAN_REQUIRE_BROKERS=1) must have it."""
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


pubsub = import_or_skip("gochan.drivers.pubsub")
pubsub_v1 = import_or_skip("google.cloud.pubsub_v1")

PubSubDriver = pubsub.PubSubDriver

PROJECT = "gochan-test"
EMULATOR_REL = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
SDK_ROOTS = [
    Path("/usr/lib/google-cloud-sdk"),
    Path("/usr/share/google-cloud-sdk"),
    Path("/opt/google-cloud-sdk"),
]
SERVER_START_TIMEOUT_S = 45.0
DELIVERY_TIMEOUT_S = 15.0
QUIET_S = 1.0
TEST_TIMEOUT_S = 3.0

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


# -- the emulator ------------------------------------------------------------------


def find_emulator() -> Path | None:
    on_path = shutil.which("cloud-pubsub-emulator")
    if on_path:
        return Path(on_path)
    roots = list(SDK_ROOTS)
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.insert(0, Path(gcloud).resolve().parent.parent)
    for root in roots:
        if (root / EMULATOR_REL).is_file():
            return root / EMULATOR_REL
    return None


class Emulator:
    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        # The launcher script execs java, so the pid is the JVM's.
        self.proc = subprocess.Popen(
            [str(self.binary), "--host=127.0.0.1", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the Pub/Sub emulator did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # like a crash; it keeps nothing anyway
            self.proc.wait()
        self.proc = None


@dataclass
class PubSubServer:
    host: str
    emulator: Emulator | None


@pytest.fixture(scope="module")
def server() -> Iterator[PubSubServer]:
    host = os.environ.get("GOCHAN_PUBSUB_EMULATOR_HOST")
    if host:
        yield PubSubServer(host, None)
        return
    binary = find_emulator()
    if binary is None:
        broker_unavailable(
            "the Pub/Sub emulator (google-cloud-cli's pubsub-emulator) is not installed"
        )
    if shutil.which("java") is None:
        broker_unavailable("the Pub/Sub emulator needs java")
    try:
        emulator = Emulator(binary)
    except (OSError, RuntimeError) as exc:
        broker_unavailable(f"cannot start the Pub/Sub emulator: {exc}")
    try:
        yield PubSubServer(emulator.host, emulator)
    finally:
        emulator.stop()


def make_driver(server: PubSubServer, **kwargs: Any) -> Any:
    kwargs.setdefault("timeout", TEST_TIMEOUT_S)
    kwargs.setdefault("pull_timeout", 2)
    kwargs.setdefault("reconnect_max", 0.5)
    return PubSubDriver(project=PROJECT, emulator_host=server.host, **kwargs)


def official_publish(server: PubSubServer, topic_id: str, data: bytes) -> str:
    """Publish with Google's own client library, not the driver."""
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = server.host
    try:
        publisher = pubsub_v1.PublisherClient()
        path = publisher.topic_path(PROJECT, topic_id)
        try:
            publisher.create_topic(name=path)
        except Exception as exc:  # AlreadyExists
            if "exists" not in str(exc).lower():
                raise
        message_id: str = publisher.publish(path, data).result(timeout=DELIVERY_TIMEOUT_S)
        publisher.stop()
        publisher.transport.close()
        return message_id
    finally:
        if old is None:
            del os.environ["PUBSUB_EMULATOR_HOST"]
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old


async def subscriptions_of(server: PubSubServer, driver: Any, topic: str) -> list[str]:
    """The subscriptions of a topic, as the service lists them (plain REST)."""
    tid = quote(driver.topic_id(topic), safe="")
    url = f"http://{server.host}/v1/projects/{PROJECT}/topics/{tid}/subscriptions"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        resp.raise_for_status()
        listed = await resp.json()
    return sorted(listed.get("subscriptions", []))


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


def test_official_client_message_arrives_unchanged(server: PubSubServer) -> None:
    topic = unique("plain/with space")
    body = b"\x00\xff\xfebinary\r\nlines\n\xe2\x82\xac>>>???"

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(server)
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            message_id = await asyncio.to_thread(
                official_publish, server, driver.topic_id(topic), body
            )
            await rec.wait_messages(1)
            assert rec.messages == [(topic, body, message_id)]
        finally:
            await driver.close()

    run(main())


def test_publish_reaches_every_instance(server: PubSubServer) -> None:
    topic = unique("fanout")
    bodies = [b"one", b"", b"\x00\x01", "\u20ac".encode()]

    async def main() -> None:
        recs = [Recorder(), Recorder()]
        drivers = [make_driver(server), make_driver(server)]
        for d, r in zip(drivers, recs, strict=True):
            await d.connect(r)
        try:
            for d in drivers:
                await d.subscribe(topic)
            ids = [await drivers[i % 2].publish(topic, b) for i, b in enumerate(bodies)]
            expected = sorted(zip([topic] * len(bodies), bodies, ids, strict=True))
            for r in recs:
                await r.wait_messages(len(bodies))
                assert sorted(r.messages) == expected
        finally:
            for d in drivers:
                await d.close()

    run(main())


def test_subscribe_unsubscribe_open_and_close_the_subscription(server: PubSubServer) -> None:
    t1, t2 = unique("sub-a"), unique("sub-b")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(server)
        await driver.connect(rec)
        try:
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
        finally:
            await driver.close()

    run(main())


def test_without_create_topics_a_missing_topic_is_an_error(server: PubSubServer) -> None:
    async def main() -> None:
        driver = make_driver(server, create_topics=False)
        await driver.connect(Recorder())
        try:
            with pytest.raises(BrokerError):
                await driver.subscribe(unique("missing"))
            with pytest.raises(BrokerError):
                await driver.publish(unique("missing"), b"x")
            with pytest.raises(InvalidTopicError):
                await driver.subscribe("goog-reserved")
            assert driver.stats()["subscriptions"] == 0
        finally:
            await driver.close()

    run(main())


def test_close_deletes_the_subscriptions(server: PubSubServer) -> None:
    topic = unique("close")

    async def main() -> None:
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

    run(main())


def test_unreachable_service_fails_promptly() -> None:
    async def main() -> None:
        driver = PubSubDriver(emulator_host=f"127.0.0.1:{free_port()}", timeout=1.0)
        started = time.monotonic()
        with pytest.raises(BrokerConnectionError):
            await driver.connect(Recorder())
        assert time.monotonic() - started < 5
        await driver.close()

    run(main())


def test_emulator_restart_is_survived(server: PubSubServer) -> None:
    emulator = server.emulator
    if emulator is None:
        pytest.skip("restarts its own emulator (GOCHAN_PUBSUB_EMULATOR_HOST is set)")
    topic, other = unique("restart"), unique("restart-new")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(server)
        await driver.connect(rec)
        try:
            await driver.subscribe(topic)
            await driver.publish(topic, b"before")
            await rec.wait_messages(1)
            await asyncio.to_thread(emulator.stop)  # it forgets topics and subscriptions
            await wait_until(lambda: not driver.ready)
            started = time.monotonic()
            with pytest.raises(BrokerError):
                await driver.subscribe(other)
            with pytest.raises(BrokerError):
                await driver.publish(topic, b"lost")
            assert time.monotonic() - started < 4 * TEST_TIMEOUT_S
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
        finally:
            await driver.close()

    run(main())


def test_a_subscription_that_cannot_be_restored_is_reported(server: PubSubServer) -> None:
    emulator = server.emulator
    if emulator is None:
        pytest.skip("restarts its own emulator (GOCHAN_PUBSUB_EMULATOR_HOST is set)")
    topic = unique("doomed")

    async def main() -> None:
        rec = Recorder()
        driver = make_driver(server, create_topics=False)
        await driver.connect(rec)
        try:
            await asyncio.to_thread(official_publish, server, driver.topic_id(topic), b"x")
            await driver.subscribe(topic)
            # The restarted emulator has no topic, and the driver may not create one.
            await asyncio.to_thread(emulator.stop)
            await wait_until(lambda: not driver.ready)
            await asyncio.to_thread(emulator.start)
            await rec.wait_for(lambda: bool(rec.failures), timeout=30)
            assert [t for t, _ in rec.failures] == [topic]
            assert driver.ready
            assert driver.stats()["subscriptions"] == 0
            assert driver.stats()["reconnects"] == 1
            await driver.unsubscribe(topic)  # the streamer's follow-up is harmless
        finally:
            await driver.close()

    run(main())
