"""New connections per second per peer address: over the rate, ``429`` with
``Retry-After`` and closed; admitted again once the bucket has refilled; the
table of buckets forgets idle peers."""

from __future__ import annotations

import asyncio

import pytest

from gochan import Config, ratelimit
from gochan.errors import ConfigurationError
from gochan.ratelimit import RateLimit
from tests.support import raw_request, running

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def status_and_headers(answer: bytes) -> tuple[int, dict[str, str]]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), headers


async def test_over_the_rate_is_429_with_retry_after_then_admitted_again() -> None:
    # One new connection every 2 s, 3 at once: the 4th in a row is refused.
    async with running(connection_rate_per_peer=0.5, connection_burst_per_peer=3) as server:
        for _ in range(3):
            status, _headers = status_and_headers(await raw_request(server.port, HEALTHZ))
            assert status == 200
        answer = await raw_request(server.port, HEALTHZ)
        status, headers = status_and_headers(answer)
        assert status == 429, answer
        assert answer.endswith(b"too many new connections from your address\n")
        assert headers["connection"] == "close"
        retry = int(headers["retry-after"])
        assert 1 <= retry <= 2
        assert server.metrics.refusals["connection_rate"] == 1
        assert server.metrics.connections_refused == 1
        assert server.connections == 0  # a refusal leaves nothing behind
        await asyncio.sleep(retry)
        status, _headers = status_and_headers(await raw_request(server.port, HEALTHZ))
        assert status == 200
        assert server.metrics.refusals["connection_rate"] == 1


async def test_zero_turns_the_rate_off() -> None:
    async with running(connection_rate_per_peer=0, connection_burst_per_peer=1) as server:
        assert server.connection_rate is None
        answers = await asyncio.gather(*[raw_request(server.port, HEALTHZ) for _ in range(20)])
        assert [status_and_headers(a)[0] for a in answers] == [200] * 20
        assert "connection_rate" not in server.metrics.refusals


def test_defaults_and_validation() -> None:
    config = Config()
    assert (config.connection_rate_per_peer, config.connection_burst_per_peer) == (100.0, 200)
    with pytest.raises(ConfigurationError, match="connection_burst_per_peer"):
        Config(connection_burst_per_peer=0)
    with pytest.raises(ConfigurationError, match="connection_rate_per_peer"):
        Config(connection_rate_per_peer=-1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_rate_and_refill() -> None:
    clock = Clock()
    rate = RateLimit(10, 5, clock)
    assert [rate.take("a") for _ in range(5)] == [0.0] * 5
    assert rate.take("a") == pytest.approx(0.1)  # one more in 1/10 s
    assert rate.take("b") == 0.0  # another address has its own bucket
    clock.now += 0.1
    assert rate.take("a") == 0.0
    assert rate.take("a") > 0
    clock.now += 0.5
    assert [rate.take("a") for _ in range(5)] == [0.0] * 5
    assert rate.take("a") > 0


def test_idle_peers_are_forgotten_and_the_table_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    rate = RateLimit(100, 200, clock)
    for i in range(1000):
        assert rate.take(f"10.0.{i // 256}.{i % 256}") == 0.0
    assert len(rate) == 1000
    clock.now += 0.005  # not full again yet: nobody is forgotten
    assert rate.forget_idle() == 0 and len(rate) == 1000
    clock.now += 0.01  # every bucket is full again: same as never seen
    assert rate.forget_idle() == 1000 and len(rate) == 0
    # However many addresses come at once, the table stays within MAX_KEYS.
    monkeypatch.setattr(ratelimit, "MAX_KEYS", 50)
    for i in range(500):
        assert rate.take(f"10.1.{i // 256}.{i % 256}") == 0.0
        assert len(rate) <= 50
