"""Micro benchmarks of the Cython core (pytest-benchmark), each beside its
pure-Python twin so the figure to read is the ratio of the two in one run.

    pytest bench/test_micro.py --benchmark-group-by=group

Not part of the test suite (``testpaths`` is ``tests``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gochan._fast import core, pure

IMPLS = {"compiled": core, "pure": pure}


class NullTransport:
    """Counts writes; the cost of a real socket is what the load test measures."""

    __slots__ = ("bytes", "writes")

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)


class ManualLoop:
    def __init__(self) -> None:
        self.ready: list[Callable[[], Any]] = []

    def call_soon(self, cb: Callable[[], Any]) -> None:
        self.ready.append(cb)

    def call_later(self, delay: float, cb: Callable[[], Any]) -> None:
        self.ready.append(cb)

    def run(self) -> None:
        ready, self.ready = self.ready, []
        for cb in ready:
            cb()


BODIES = {
    "64B": b'{"payload":"Topic42 1234567890123"}'.ljust(64, b" "),
    "1KiB": b"x" * 1024,
    "16KiB": b"y" * 16 * 1024,
    "16KiB-256lines": b"\n".join([b"z" * 63] * 256),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("body", BODIES)
def test_encode_frame(benchmark: Any, impl: str, body: str) -> None:
    benchmark.group = f"encode {body}"
    encode = IMPLS[impl].encode_event
    data = BODIES[body]
    frame = benchmark(encode, "Topic42", "5f1e2d3c-123456", data)
    assert frame.endswith(b"\n\n")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("receivers", [1, 100, 10_000])
def test_fanout_one_message(benchmark: Any, impl: str, receivers: int) -> None:
    """Publish one frame to N subscribers and flush (one write each)."""
    benchmark.group = f"fan-out to {receivers}"
    mod = IMPLS[impl]
    loop = ManualLoop()
    hub = mod.Hub(loop)
    transports = [NullTransport() for _ in range(receivers)]
    for t in transports:
        hub.subscribe(mod.Subscriber(hub, t), "Topic42")
    frame = mod.encode_event("Topic42", "1-1", BODIES["64B"])

    def publish_and_flush() -> None:
        hub.publish("Topic42", frame)
        loop.run()

    benchmark(publish_and_flush)
    assert transports[-1].writes > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_fanout_coalesced_batch(benchmark: Any, impl: str) -> None:
    """One message on each of 100 topics, 1,000 streams holding 10 topics
    each (100 per topic), then one flush: 100,000 deliveries leave in 1,000
    writes, one per stream."""
    benchmark.group = "batch 100 msgs x 1000 streams"
    mod = IMPLS[impl]
    loop = ManualLoop()
    hub = mod.Hub(loop)
    topics = [f"Topic{i}" for i in range(100)]
    for i in range(1000):
        sub = mod.Subscriber(hub, NullTransport())
        for k in range(10):
            hub.subscribe(sub, topics[(i + k * 10) % 100])
    frames = [mod.encode_event(t, "1-1", BODIES["64B"]) for t in topics]

    def batch() -> None:
        for topic, frame in zip(topics, frames, strict=True):
            hub.publish(topic, frame)
        loop.run()

    benchmark(batch)


@pytest.mark.parametrize("receivers", [1, 100])
def test_on_message_and_flush(benchmark: Any, receivers: int) -> None:
    """One message from the driver through Streamer.on_message (numbering,
    history, the publish-to-write timestamp) to N streams, then the flush
    (one write each, and the message's latency observation)."""
    import asyncio

    from gochan import Streamer

    benchmark.group = f"on_message + flush to {receivers}"

    async def run() -> None:
        streamer = Streamer()
        await streamer.start()
        try:
            hub = streamer.hub
            transports = [NullTransport() for _ in range(receivers)]
            subs = [core.Subscriber(hub, t) for t in transports]
            for sub in subs:
                hub.subscribe(sub, "Topic42")
            body = BODIES["64B"]

            def deliver() -> None:
                streamer.on_message("Topic42", body, None)
                hub.flush()

            benchmark(deliver)
            assert transports[-1].writes > 0
            for sub in subs:
                hub.close(sub)  # not streams of a client: nothing for close() to end
        finally:
            await streamer.close()

    asyncio.run(run())
