"""Shared plumbing for driver tests against real brokers (the tests' own
helpers are in harness.py).

A test that needs a broker which is neither pointed at by its
``GOCHAN_<BROKER>_URL`` variable nor startable here calls
:func:`broker_unavailable`: it skips with the reason, or fails when
``GOCHAN_REQUIRE_BROKERS=1`` (set by CI, so a missing broker cannot pass
silently).

Every ``async def`` driver test also fails when it leaves a task running
(a stuck listener, a reconnect loop that outlived ``close``).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

LEFTOVER_TASK_GRACE_S = 2.0


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """Check what ``async def`` tests (run by tests/conftest.py) leave behind:
    no swallowed timeout, no task still running (:func:`no_tasks_left`)."""
    test = pyfuncitem.obj
    if not inspect.iscoroutinefunction(test):
        return (yield)

    @functools.wraps(test)
    async def checked(**kwargs: Any) -> None:
        before = asyncio.all_tasks()
        await test(**kwargs)
        task = asyncio.current_task()
        # A test cancelled at its timeout that swallowed the cancellation
        # (asyncio.wait_for before 3.12 can) must not pass.
        if task is not None and getattr(task, "cancelling", lambda: 0)():
            raise AssertionError("the test ran into its timeout and swallowed the cancellation")
        await no_tasks_left(before)

    pyfuncitem.obj = checked
    try:
        return (yield)
    finally:
        pyfuncitem.obj = test


async def no_tasks_left(before: set[asyncio.Task[Any]]) -> None:
    """Wait a moment for the tasks started since ``before`` to end; fail if
    some are still running."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LEFTOVER_TASK_GRACE_S
    while True:
        left = asyncio.all_tasks() - before - {asyncio.current_task()}
        if not left:
            return
        if loop.time() > deadline:
            raise AssertionError(f"tasks left running: {left}")
        await asyncio.sleep(0.02)


def broker_unavailable(reason: str) -> NoReturn:
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        pytest.fail(f"broker required (GOCHAN_REQUIRE_BROKERS=1) but unavailable: {reason}")
    pytest.skip(reason)


def import_or_skip(module: str) -> Any:
    """pytest.importorskip, except that CI (GOCHAN_REQUIRE_BROKERS=1) must have it."""
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        broker_unavailable(f"{name} is not installed")
    return path


async def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not port_open(host, port, 0.2):
        if loop.time() > deadline:
            raise TimeoutError(f"{host}:{port} did not open within {timeout}s")
        await asyncio.sleep(0.05)
