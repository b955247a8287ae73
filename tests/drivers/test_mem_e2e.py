"""The in-memory driver end to end through gochan's HTTP surface
(tests/drivers/e2e.py). It reaches no other process, so only what one node
does is checked: Last-Event-ID replay from gochan's history."""

from __future__ import annotations

from . import e2e


async def _no_broker_client(topic: str, data: bytes) -> None:
    raise AssertionError("mem has no broker of its own to publish through")


async def test_replay_on_the_same_node() -> None:
    broker = e2e.Broker("mem", {}, _no_broker_client)
    await e2e.check_replay_on_the_same_node(broker, via_broker=False)
