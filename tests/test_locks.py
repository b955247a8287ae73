"""KeyedLocks (gochan/locks.py): one body at a time per key, and no lock
kept for a key nobody holds or waits for."""

from __future__ import annotations

import asyncio

import pytest

from gochan.locks import KeyedLocks


class Bodies:
    """Bodies run under ``locks.hold(key)``, recording how many were inside
    at once."""

    def __init__(self, locks: KeyedLocks[str]) -> None:
        self.locks = locks
        self.inside: dict[str, int] = {}
        self.most = 0
        self.entered: list[str] = []

    async def run(self, name: str, key: str = "k", gate: asyncio.Event | None = None) -> None:
        async with self.locks.hold(key):
            self.entered.append(name)
            self.inside[key] = self.inside.get(key, 0) + 1
            self.most = max(self.most, self.inside[key])
            if gate is not None:
                await gate.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            self.inside[key] -= 1

    async def held_and_waited_for(
        self, waiter: str
    ) -> tuple[asyncio.Event, asyncio.Task[None], asyncio.Task[None]]:
        """A holder on "k" inside its body until the event is set, and
        ``waiter`` queued behind it."""
        gate = asyncio.Event()
        held = asyncio.create_task(self.run("holder", gate=gate))
        await asyncio.sleep(0)
        waiting = asyncio.create_task(self.run(waiter))
        await asyncio.sleep(0)
        return gate, held, waiting


async def test_a_caller_that_comes_as_the_lock_is_handed_on_waits_its_turn() -> None:
    """The holder releases, the first waiter is woken but has not run yet,
    and a new caller comes in between: it must wait too, not find the key
    free (an asyncio.Lock reads as unlocked in that moment)."""
    locks: KeyedLocks[str] = KeyedLocks()
    bodies = Bodies(locks)
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    late: list[asyncio.Task[None]] = []

    async def first() -> None:
        async with locks.hold("k"):
            bodies.entered.append("first")
            await gate.wait()
            # Runs after this release and before the waiter's wakeup.
            loop.call_soon(lambda: late.append(loop.create_task(bodies.run("late"))))

    holder = loop.create_task(first())
    await asyncio.sleep(0)
    waiter = loop.create_task(bodies.run("waiter"))
    await asyncio.sleep(0)
    assert locks.busy("k")
    gate.set()
    await holder
    await waiter
    await asyncio.gather(*late)
    assert bodies.entered == ["first", "waiter", "late"]
    assert bodies.most == 1
    assert len(locks) == 0 and not locks.busy("k")


async def test_keys_do_not_wait_for_each_other_and_leave_nothing_behind() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    bodies = Bodies(locks)
    gate = asyncio.Event()
    held = asyncio.create_task(bodies.run("a1", "a", gate))
    await asyncio.sleep(0)
    await bodies.run("b1", "b")  # not held up by "a"
    queued = [asyncio.create_task(bodies.run(f"a{n}", "a")) for n in (2, 3)]
    await asyncio.sleep(0)
    assert locks.busy("a") and not locks.busy("b") and len(locks) == 1
    gate.set()
    await asyncio.gather(held, *queued)
    assert bodies.entered == ["a1", "b1", "a2", "a3"]
    assert bodies.most == 1
    assert len(locks) == 0


async def test_a_waiter_cancelled_or_a_body_that_raises_leaves_no_lock() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    bodies = Bodies(locks)
    gate, held, waiting = await bodies.held_and_waited_for("cancelled")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    gate.set()
    await held
    assert len(locks) == 0

    with pytest.raises(ValueError):
        async with locks.hold("k"):
            raise ValueError("inside")
    assert len(locks) == 0
    await bodies.run("after")  # the key is free again
    assert bodies.entered == ["holder", "after"]


async def test_a_hold_nobody_waits_for_makes_no_asyncio_lock() -> None:
    """The usual hold (a new client, one topic's subscribe) finds its key
    free: the entry alone marks it held, and a lock is made only for the
    first caller that has to wait."""
    locks: KeyedLocks[str] = KeyedLocks()
    async with locks.hold("k"):
        assert locks._entries["k"].lock is None
    bodies = Bodies(locks)
    gate, held, waiter = await bodies.held_and_waited_for("waiter")
    assert locks._entries["k"].lock is not None and locks._entries["k"].users == 2
    gate.set()
    await asyncio.gather(held, waiter)
    assert bodies.most == 1 and len(locks) == 0
