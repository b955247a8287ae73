"""Test plumbing: ``async def`` tests run on uvloop (helpers: tests/support.py);
``GOCHAN_TEST_LOOP=asyncio`` runs them on the stdlib loop instead."""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any

import pytest
import uvloop

TEST_TIMEOUT_S = 30.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on a fresh uvloop loop (or asyncio's, see
    above); fail on any exception the loop reports that nobody handled."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    unhandled: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
        await asyncio.wait_for(pyfuncitem.obj(**kwargs), TEST_TIMEOUT_S)

    if os.environ.get("GOCHAN_TEST_LOOP", "uvloop") == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())
    if unhandled:
        pytest.fail(f"unhandled exception in the event loop: {unhandled[0]}")
    return True
