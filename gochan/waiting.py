"""Waiting with a time limit, without losing a cancellation.

Python 3.11's ``asyncio.wait_for`` runs what it waits for as a task of its
own. When that ends in the same loop pass as a cancel of the waiting task,
``wait_for`` returns its result and the cancel is gone: a loop that was
meant to end goes on, and whoever cancelled it waits for it for ever. That
was seen as a driver's ``close()`` waiting past its test's 30 s on a
Pub/Sub pull loop that had been cancelled just as an acknowledgement came
back.

:func:`within` waits in the waiting task itself under ``asyncio.timeout``,
which tells its own cancel from anyone else's, so neither is lost. Python
3.10 has no ``asyncio.timeout``; there :func:`within` is ``wait_for``, with
its flaw.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["within"]

_T = TypeVar("_T")

if sys.version_info >= (3, 11):

    async def within(aw: Awaitable[_T], timeout_s: float) -> _T:
        """``await aw``, or :class:`TimeoutError` after ``timeout_s``; a
        cancel of the caller always ends it with ``CancelledError``."""
        async with asyncio.timeout(timeout_s):
            return await aw

else:  # pragma: no cover - the machine that tests this runs 3.11

    async def within(aw: Awaitable[_T], timeout_s: float) -> _T:
        """``await aw``, or :class:`TimeoutError` after ``timeout_s``."""
        return await asyncio.wait_for(aw, timeout_s)
