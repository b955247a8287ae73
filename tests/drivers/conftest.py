"""Shared helpers for driver tests against real brokers.

A test that needs a broker which is neither pointed at by its
``GOCHAN_<BROKER>_URL`` variable nor startable here calls
:func:`broker_unavailable`: it skips with the reason, or fails when
``GOCHAN_REQUIRE_BROKERS=1`` (set by CI, so a missing broker cannot pass
silently).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from typing import NoReturn

import pytest


def broker_unavailable(reason: str) -> NoReturn:
    if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
        pytest.fail(f"broker required (GOCHAN_REQUIRE_BROKERS=1) but unavailable: {reason}")
    pytest.skip(reason)


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
