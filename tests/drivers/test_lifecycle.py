"""The lifecycle every broker driver shares (gochan/drivers/_lifecycle.py):
one state, one reconnection loop, one stats() schema, one guarded delivery
path, one option vocabulary. No broker needed: the drivers are only built,
and the loop is driven through a fake driver."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gochan.drivers import DRIVERS, create_driver
from gochan.drivers._common import cancel_and_wait
from gochan.drivers._lifecycle import Lifecycle, State
from gochan.errors import BrokerConnectionError, ClosedError, ConfigurationError

from .conftest import import_or_skip
from .harness import Recorder, wait_until

BROKER_DRIVERS = sorted(set(DRIVERS) - {"mem"})
STATS_KEYS = {
    "driver", "state", "ready", "subscriptions", "reconnects", "published", "received",
    "failures", "stray", "broker",
}  # fmt: skip


def build(name: str, **options: Any) -> Any:
    import_or_skip(DRIVERS[name][0])
    return create_driver(name, options)


@pytest.mark.parametrize("name", [*sorted(DRIVERS), "redis-streams"])
def test_every_driver_has_the_same_stats_keys(name: str) -> None:
    driver = build("redis", streams=True) if name == "redis-streams" else build(name)
    stats = driver.stats()
    assert set(stats) == STATS_KEYS
    assert stats["driver"] == driver.name
    assert (stats["ready"], stats["reconnects"], stats["subscriptions"]) == (False, 0, 0)


@pytest.mark.parametrize("name", BROKER_DRIVERS)
def test_every_broker_driver_validates_the_reconnect_options(name: str) -> None:
    assert build(name).state is State.IDLE
    with pytest.raises(ConfigurationError, match="reconnect_max must not be below"):
        build(name, reconnect_min=2.0, reconnect_max=1.0)
    with pytest.raises(ConfigurationError, match="reconnect_min must be positive"):
        build(name, reconnect_min=0)


class FakeDriver(Lifecycle[int]):
    """Connections are numbers; ``fail_opens`` opens fail, then they work."""

    name = "fake"
    broker = "Fake"

    def __init__(self, fail_opens: int = 0) -> None:
        super().__init__(0.01, 0.02)
        self._topics: set[str] = set()
        self.fail_opens = fail_opens
        self.opened = 0
        self.discarded: list[int] = []

    async def _open(self) -> int:
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise OSError("refused")
        self.opened += 1
        return self.opened

    async def _restore(self, conn: int) -> bool:
        return True

    async def _discard(self, conn: int) -> None:
        self.discarded.append(conn)

    async def _close(self) -> None:
        self._topics.clear()


async def test_the_one_loop_reconnects_and_counts() -> None:
    driver = FakeDriver()
    rec = Recorder()
    await driver.connect(rec)
    assert driver.ready and driver.stats()["state"] == "ready"
    driver._topics.add("t")
    driver.fail_opens = 3
    driver._lose("fault injected")
    assert driver.state is State.RECONNECTING
    with pytest.raises(BrokerConnectionError, match="reconnecting"):
        driver._check_ready()
    await wait_until(lambda: driver.ready)
    assert driver.stats()["reconnects"] == 1
    assert driver.discarded == [1]
    await driver.close()
    assert driver.state is State.CLOSED
    with pytest.raises(ClosedError):
        await driver.connect(rec)


async def test_a_failed_connect_leaves_the_driver_idle() -> None:
    driver = FakeDriver(fail_opens=1)
    with pytest.raises(BrokerConnectionError, match="cannot connect to Fake"):
        await driver.connect(Recorder())
    assert driver.state is State.IDLE
    await driver.connect(Recorder())
    assert driver.ready
    await driver.close()


async def test_delivery_is_guarded_and_counted() -> None:
    class Failing(Recorder):
        def on_message(self, topic: str, data: bytes, event_id: str | None) -> str:
            raise RuntimeError("receiver bug")

    driver = FakeDriver()
    await driver.connect(Failing())
    driver._topics.add("held")
    driver._deliver("held", b"x")  # logged, not raised
    driver._deliver("other", b"x")
    driver._deliver(None, b"x")
    stats = driver.stats()
    assert (stats["received"], stats["stray"]) == (1, 2)
    await driver.close()
    await asyncio.sleep(0)


async def cancel_and_wait_cancelled_midway(task: asyncio.Task[None]) -> asyncio.Task[None]:
    """A caller of cancel_and_wait(task), cancelled while the task cleans up."""
    caller = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)  # the caller waits on the task's cleanup now
    caller.cancel()
    return caller


async def test_cancel_and_wait_lets_the_task_clean_up_and_keeps_the_callers_cancellation() -> None:
    cleaned = asyncio.Event()
    started = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            started.set()
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # cleanup that must not be cut short
            cleaned.set()

    task = asyncio.create_task(slow_to_stop())
    await started.wait()
    caller = await cancel_and_wait_cancelled_midway(task)
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert caller.cancelled()  # not swallowed as if it were the task's
    await asyncio.wait_for(cleaned.wait(), 1)  # the cleanup ran to its end
    assert task.cancelled()


async def test_cancel_and_wait_returns_once_the_task_is_cancelled_and_raises_its_error() -> None:
    async def sleeper() -> None:
        await asyncio.sleep(3600)

    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    quiet = asyncio.create_task(sleeper())
    await asyncio.sleep(0)
    await cancel_and_wait(quiet)  # returns: the cancellation is the task's, not ours
    assert quiet.cancelled()
    await cancel_and_wait(None)
    noisy = asyncio.create_task(fails_on_cancel())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(noisy)


async def test_cancel_and_wait_logs_an_error_that_ends_the_task_after_its_caller_is_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()

    async def fails_late() -> None:
        try:
            started.set()
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)
            raise RuntimeError("cleanup failed late")

    task = asyncio.create_task(fails_late(), name="late-failer")
    await started.wait()
    caller = await cancel_and_wait_cancelled_midway(task)
    with caplog.at_level(logging.WARNING, logger="gochan.broker"):
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.wait((task,))
        await asyncio.sleep(0)  # the done callbacks run
    assert [r.getMessage() for r in caplog.records if "late-failer" in r.getMessage()] == [
        "late-failer failed while it was being stopped: RuntimeError('cleanup failed late')"
    ]
