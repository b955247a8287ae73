"""What the driver tests share: a recording Receiver, waits, unique names,
and the checks every driver must pass without a broker.

Driver tests are plain ``async def`` functions: tests/conftest.py runs them
on uvloop under a timeout and fails one that leaves an unhandled exception in
the event loop; tests/drivers/conftest.py also fails one that leaves a task
running (a stuck listener, a reconnect loop that outlived ``close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from gochan.drivers import Driver, create_driver
from gochan.errors import BrokerConnectionError, BrokerError, ClosedError

DELIVERY_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.01

# Bodies that a careless relay would mangle.
BINARY_BODY = bytes(range(256)) * 4
MULTILINE_BODY = b"line one\nline two\r\nline three\rline four\n\n"

Message = tuple[str, bytes, str | None]

_D = TypeVar("_D", bound=Driver)


@dataclass
class Recorder:
    """The streamer's stand-in: records what the driver delivers."""

    messages: list[Message] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # How long the waits below wait by default.
    timeout: float = field(default=DELIVERY_TIMEOUT_S, kw_only=True)

    def on_message(self, topic: str, data: bytes, event_id: str | None) -> str:
        self.messages.append((topic, data, event_id))
        self.changed.set()
        return event_id or str(len(self.messages))  # the streamer numbers it

    def on_subscription_failure(self, topic: str, message: str) -> None:
        self.failures.append((topic, message))
        self.changed.set()

    def bodies(self, topic: str) -> list[bytes]:
        return [data for t, data, _ in self.messages if t == topic]

    async def wait_for(self, pred: Callable[[], bool], timeout: float | None = None) -> None:
        """Until ``pred()`` holds, woken by every delivery and failure."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while not pred():
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out; messages={self.messages} failures={self.failures}"
                )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)

    async def wait_messages(self, n: int, timeout: float | None = None) -> list[Message]:
        """Until at least ``n`` messages arrived; returns them all."""
        await self.wait_for(lambda: len(self.messages) >= n, timeout)
        return self.messages

    async def wait_body(self, topic: str, body: bytes, timeout: float | None = None) -> None:
        """Until ``body`` arrived on ``topic``."""
        await self.wait_for(lambda: body in self.bodies(topic), timeout)


@contextlib.asynccontextmanager
async def connected(
    driver: _D, recorder: Recorder | None = None
) -> AsyncIterator[tuple[_D, Recorder]]:
    """``driver`` connected to a fresh :class:`Recorder`, closed afterwards."""
    recorder = Recorder() if recorder is None else recorder
    await driver.connect(recorder)
    try:
        yield driver, recorder
    finally:
        await driver.close()


async def wait_until(
    pred: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT_S, what: str = "condition"
) -> None:
    """Until ``pred()`` holds (polled)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


def unique(name: str = "t") -> str:
    """``name`` made unique, for topics that no other test or run shares."""
    return f"{name}-{uuid.uuid4().hex[:10]}"


# -- checks every driver must pass -----------------------------------------------


def check_registry(name: str, options: dict[str, Any], cls: type[Driver]) -> None:
    """``create_driver`` builds the driver from its options, without I/O."""
    driver = create_driver(name, options)
    assert isinstance(driver, cls)
    assert driver.name == name
    assert not driver.ready


async def check_connect_to_nothing(driver: Driver, within_s: float) -> None:
    """Connecting where no broker listens fails within ``within_s`` with
    BrokerConnectionError; the driver is not ready, closes, and stays closed."""
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError):
        await asyncio.wait_for(driver.connect(Recorder()), within_s)
    assert time.monotonic() - started < within_s
    assert not driver.ready
    await driver.close()
    with pytest.raises(ClosedError):
        await driver.connect(Recorder())


async def check_closed(driver: Driver, topic: str) -> None:
    """A closed driver refuses to subscribe and to publish with ClosedError."""
    with pytest.raises(ClosedError):
        await driver.subscribe(topic)
    with pytest.raises(ClosedError):
        await driver.publish(topic, b"x")


async def check_refused_while_down(
    driver: Driver,
    new_topic: str,
    held_topic: str,
    within_s: float,
    error: type[BrokerError] = BrokerError,
) -> None:
    """With the broker down, subscribing to ``new_topic`` and publishing to
    ``held_topic`` both fail with ``error``, together within ``within_s``."""
    started = time.monotonic()
    with pytest.raises(error):
        await driver.subscribe(new_topic)
    with pytest.raises(error):
        await driver.publish(held_topic, b"lost")
    assert time.monotonic() - started < within_s


async def check_close_while_reconnecting(driver: Driver, stop: Callable[[], None]) -> None:
    """``driver`` connected and subscribed, then ``stop`` (the broker) and
    ``close`` while it reconnects: tests/drivers/conftest.py then checks that
    no task is left."""
    await driver.connect(Recorder())
    await driver.subscribe(unique())
    await asyncio.to_thread(stop)
    await wait_until(lambda: not driver.ready)
    await asyncio.sleep(0.3)
    await driver.close()


async def check_fan_out(
    one: tuple[Driver, Recorder],
    two: tuple[Driver, Recorder],
    three: tuple[Driver, Recorder],
    sent: list[bytes] | None = None,
) -> None:
    """Fan-out, not competition: ``one`` and ``two`` hold "news" and each gets
    every message, in order, whether published by ``one`` (which holds the
    topic) or by ``three`` (which does not: it holds "other", and gets none).
    ``sent`` defaults to 50 numbered messages."""
    (driver1, rec1), (driver2, rec2), (driver3, rec3) = one, two, three
    await driver1.subscribe("news")
    await driver2.subscribe("news")
    await driver3.subscribe("other")
    sent = [f"message {i}".encode() for i in range(50)] if sent is None else sent
    for data in sent[:25]:
        assert await driver1.publish("news", data) is None
    for data in sent[25:]:
        await driver3.publish("news", data)  # from a process not holding it
    await rec1.wait_body("news", sent[-1])
    await rec2.wait_body("news", sent[-1])
    assert rec1.bodies("news") == sent  # every message, in order
    assert rec2.bodies("news") == sent
    await driver3.publish("other", b"sentinel")
    await rec3.wait_body("other", b"sentinel")
    assert rec3.bodies("news") == []
    assert driver1.stats()["published"] == 25
