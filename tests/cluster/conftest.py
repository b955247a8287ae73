"""Cluster tests: their own NATS (JetStream on) and Redis processes, so a test
can stop the store under a running cluster."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..drivers._nats_server import NatsServer
from ..drivers._redis_server import RedisServer


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    yield from NatsServer.running()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from RedisServer.running()
