"""within (gochan/waiting.py): a time limit that never loses a cancel, and
no ``asyncio.wait_for`` left in gochan to lose one."""

from __future__ import annotations

import ast
import asyncio
import sys
from pathlib import Path

import pytest

import gochan
from gochan.drivers._common import bounded
from gochan.waiting import within

needs_311 = pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 has only wait_for")


async def _cancel_as_it_ends(waiting: asyncio.Task[int], awaited: asyncio.Future[int]) -> None:
    """End ``awaited`` and cancel ``waiting`` in the same loop pass."""
    await asyncio.sleep(0)  # ``waiting`` is now inside its wait
    awaited.set_result(1)
    waiting.cancel()


@needs_311
async def test_a_cancel_that_comes_as_the_wait_ends_is_not_lost() -> None:
    awaited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(within(awaited, 10))
    await _cancel_as_it_ends(waiting, awaited)
    with pytest.raises(asyncio.CancelledError):
        await waiting


@needs_311
async def test_a_loop_of_bounded_calls_ends_when_cancelled_in_that_pass() -> None:
    """The shape of a driver's pull loop: each pass awaits a bounded broker
    call. Cancelled as a call comes back, the loop must still end."""
    replies: asyncio.Queue[asyncio.Future[int]] = asyncio.Queue()
    passes = 0

    async def loop() -> int:
        nonlocal passes
        while True:
            reply: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            replies.put_nowait(reply)
            await bounded(reply, 10, "broker")
            passes += 1

    task = asyncio.create_task(loop())
    await _cancel_as_it_ends(task, await replies.get())
    done, _ = await asyncio.wait((task,), timeout=2)
    assert done == {task}
    assert task.cancelled()
    assert passes == 0


async def test_the_limit_still_raises_timeout_error() -> None:
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError, match=r"no answer from broker within 0\.01s"):
        await bounded(never, 0.01, "broker")
    assert never.cancelled()


async def test_what_ends_in_time_is_returned() -> None:
    async def answer() -> str:
        await asyncio.sleep(0)
        return "yes"

    assert await within(answer(), 5) == "yes"


def test_nothing_in_gochan_waits_with_wait_for() -> None:
    root = Path(gochan.__file__).parent
    users = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "waiting.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                users.append(f"{path.relative_to(root)}:{node.lineno}")
    assert users == []
