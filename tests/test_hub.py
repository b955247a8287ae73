"""The fan-out hub against a fake transport (a unit test of one class), and
against its pure-Python twin: the same operations must put the same bytes on
every connection."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from gochan._fast import core, pure


class FakeLoop:
    """Deterministic call_soon: callbacks run only when the test says so."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], Any]] = []
        self.delays: list[float] = []

    def call_soon(self, cb: Callable[[], Any]) -> None:
        self.ready.append(cb)

    def call_later(self, delay: float, cb: Callable[[], Any]) -> None:
        self.delays.append(delay)
        self.ready.append(cb)

    def run(self) -> None:
        while self.ready:
            self.ready.pop(0)()


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    @property
    def output(self) -> bytes:
        return b"".join(self.writes)


@pytest.fixture(params=[core, pure], ids=["compiled", "pure"])
def impl(request: pytest.FixtureRequest) -> Any:
    return request.param


def test_publish_reaches_only_subscribers(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    ta, tb = FakeTransport(), FakeTransport()
    a, b = impl.Subscriber(hub, ta), impl.Subscriber(hub, tb)
    assert hub.subscribe(a, "x") and hub.subscribe(b, "y")
    assert not hub.subscribe(a, "x")  # already in
    assert hub.publish("x", b"X") == 1
    assert hub.publish("nobody", b"N") == 0
    loop.run()
    assert ta.output == b"X" and tb.output == b""


def test_frames_for_one_connection_are_coalesced_into_one_write(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    t = FakeTransport()
    sub = impl.Subscriber(hub, t)
    hub.subscribe(sub, "x")
    hub.subscribe(sub, "y")
    for i in range(10):
        hub.publish("x" if i % 2 else "y", b"%d;" % i)
    assert t.writes == []  # nothing before the flush
    loop.run()
    assert t.writes == [b"0;1;2;3;4;5;6;7;8;9;"]


def test_one_frame_object_is_shared_by_every_receiver() -> None:
    loop = FakeLoop()
    hub = core.Hub(loop)
    transports = [FakeTransport() for _ in range(3)]
    written: list[bytes] = []
    for t in transports:
        t.write = written.append  # type: ignore[method-assign]
    subs = [core.Subscriber(hub, t) for t in transports]
    for sub in subs:
        hub.subscribe(sub, "x")
    frame = b"event: x\ndata: shared\n\n"
    hub.publish("x", frame)
    loop.run()
    assert len(written) == 3 and all(w is frame for w in written)


def test_unsubscribe_and_close_remove_from_every_topic(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    subs = [impl.Subscriber(hub, FakeTransport()) for _ in range(5)]
    for sub in subs:
        for topic in ("a", "b", "c"):
            hub.subscribe(sub, topic)
    assert hub.subscriber_count("a") == 5
    assert hub.unsubscribe(subs[0], "a")
    assert not hub.unsubscribe(subs[0], "a")
    hub.close(subs[2])
    assert hub.subscriber_count("a") == 3 and hub.subscriber_count("b") == 4
    assert sorted(subs[1].topics) == ["a", "b", "c"] and subs[2].topics == []
    for sub in subs:
        hub.close(sub)
    assert hub.subscriber_count("a") == 0
    assert not hub.subscribe(subs[1], "a")  # closed subscribers cannot come back


def test_subscribe_all_joins_each_topic_once(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    t, other = FakeTransport(), FakeTransport()
    sub, late = impl.Subscriber(hub, t), impl.Subscriber(hub, other)
    assert hub.subscribe(sub, "a")
    assert hub.subscribe_all(sub, ["a", "b", "c", "b"]) == 2  # "a" was in, "b" twice
    assert sorted(sub.topics) == ["a", "b", "c"]
    assert hub.subscribe_all(sub, []) == 0
    assert hub.subscribe_all(late, ("c", "d")) == 2
    for topic in "abcd":
        hub.publish(topic, topic.encode())
    loop.run()
    assert t.output == b"abc" and other.output == b"cd"
    assert hub.unsubscribe(sub, "b") and sorted(sub.topics) == ["a", "c"]
    hub.close(sub)
    assert hub.subscriber_count("c") == 1 and hub.subscribe_all(sub, ["a"]) == 0


def test_slow_consumer_is_dropped_past_the_bound(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop, 100)
    slow_t, fast_t = FakeTransport(), FakeTransport()
    slow, fast = impl.Subscriber(hub, slow_t), impl.Subscriber(hub, fast_t)
    hub.subscribe(slow, "x")
    hub.subscribe(fast, "x")
    slow.pause()  # its transport buffer is full
    for _ in range(5):
        hub.publish("x", b"x" * 30)
        loop.run()
    assert slow_t.aborted and slow.closed
    assert hub.slow_disconnects == 1
    assert fast_t.output == b"x" * 150 and not fast_t.closed
    assert hub.subscriber_count("x") == 1


def test_paused_connection_gets_held_frames_on_resume(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    t = FakeTransport()
    sub = impl.Subscriber(hub, t)
    hub.subscribe(sub, "x")
    sub.pause()
    hub.publish("x", b"1")
    hub.publish("x", b"2")
    loop.run()
    assert t.output == b"" and sub.pending_bytes == 2
    sub.resume()
    assert t.output == b"12" and sub.pending_bytes == 0


def test_heartbeat_only_on_idle_streams(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    busy_t, idle_t = FakeTransport(), FakeTransport()
    busy, _idle = impl.Subscriber(hub, busy_t), impl.Subscriber(hub, idle_t)
    hub.subscribe(busy, "x")
    hub.publish("x", b"m")
    assert hub.heartbeat(b":\n\n") == 1
    loop.run()
    assert idle_t.output == b":\n\n" and busy_t.output == b"m"
    # Next period: nobody sent anything, so both get one.
    assert hub.heartbeat(b":\n\n") == 2
    loop.run()
    assert busy_t.output == b"m:\n\n" and idle_t.output == b":\n\n:\n\n"


def test_finish_writes_last_frame_then_closes(impl: Any) -> None:
    loop = FakeLoop()
    hub = impl.Hub(loop)
    t = FakeTransport()
    sub = impl.Subscriber(hub, t)
    hub.subscribe(sub, "x")
    hub.publish("x", b"m;")
    hub.finish(sub, b"bye")
    loop.run()
    assert t.output == b"m;bye" and t.closed and hub.subscriber_count("x") == 0


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_match_the_pure_twin(seed: int) -> None:
    """Swap-removal bookkeeping under churn: same bytes per connection as the twin."""
    rng = random.Random(seed)
    loops = [FakeLoop(), FakeLoop()]
    hubs = [core.Hub(loops[0]), pure.Hub(loops[1])]
    transports: list[tuple[FakeTransport, FakeTransport]] = []
    subs: list[tuple[Any, Any]] = []
    topics = [f"t{i}" for i in range(8)]
    for step in range(3000):
        op = rng.random()
        if op < 0.1 or not subs:
            pair = (FakeTransport(), FakeTransport())
            transports.append(pair)
            subs.append((core.Subscriber(hubs[0], pair[0]), pure.Subscriber(hubs[1], pair[1])))
        elif op < 0.4:
            i, topic = rng.randrange(len(subs)), rng.choice(topics)
            assert hubs[0].subscribe(subs[i][0], topic) == hubs[1].subscribe(subs[i][1], topic)
        elif op < 0.55:
            i, topic = rng.randrange(len(subs)), rng.choice(topics)
            assert hubs[0].unsubscribe(subs[i][0], topic) == hubs[1].unsubscribe(subs[i][1], topic)
        elif op < 0.6:
            i = rng.randrange(len(subs))
            hubs[0].close(subs[i][0])
            hubs[1].close(subs[i][1])
        else:
            topic = rng.choice(topics)
            frame = b"%s:%d;" % (topic.encode(), step)
            assert hubs[0].publish(topic, frame) == hubs[1].publish(topic, frame)
        if rng.random() < 0.2:
            loops[0].run()
            loops[1].run()
    loops[0].run()
    loops[1].run()
    for topic in topics:
        assert hubs[0].subscriber_count(topic) == hubs[1].subscriber_count(topic)
    for (compiled, twin), (sc, sp) in zip(transports, subs, strict=True):
        assert compiled.output == twin.output
        assert sorted(sc.topics) == sorted(sp.topics)


def test_flush_waits_longer_under_load_and_not_at_light_load() -> None:
    """A flush that took a while (many writes) makes the next one wait about as
    long (bounded), so more frames collect per connection; a quick one doesn't."""
    loop = FakeLoop()
    hub = core.Hub(loop, max_delay=0.05)

    class SlowTransport(FakeTransport):
        def write(self, data: bytes) -> None:
            time.sleep(0.002)  # stands in for a flush over many sockets
            super().write(data)

    slow = core.Subscriber(hub, SlowTransport())
    hub.subscribe(slow, "x")
    hub.publish("x", b"1")
    loop.run()
    assert loop.delays == [] and 0.002 <= hub.next_delay <= 0.05
    hub.publish("x", b"2")  # the next flush is scheduled with that delay
    assert loop.delays == [hub.next_delay]
    loop.run()
    hub.close(slow)
    quick = core.Subscriber(hub, FakeTransport())
    hub.subscribe(quick, "x")
    hub.publish("x", b"3")  # still after the slow flush's delay...
    loop.run()
    assert len(loop.delays) == 2
    assert hub.next_delay == 0.0  # ...but this flush was cheap: none next time
    hub.publish("x", b"4")
    loop.run()
    assert len(loop.delays) == 2


def test_latency_is_observed_once_per_message_at_the_end_of_its_flush() -> None:
    loop = FakeLoop()
    hub = core.Hub(loop)
    subs = [core.Subscriber(hub, FakeTransport()) for _ in range(3)]
    for sub in subs:
        hub.subscribe(sub, "x")
    assert hub.publish("nobody", b"0") == 0  # reached no stream: not timed
    old = time.monotonic() - 2.0
    assert hub.publish("x", b"1", old) == 3
    assert hub.publish("x", b"2") == 3  # since: 0, timed from the publish itself
    assert hub.latency.count == 0  # nothing written yet
    loop.run()
    bounds, cumulative, total = hub.latency.snapshot()
    assert hub.latency.count == cumulative[-1] == 2  # per message, not per delivery (6)
    # The message that arrived 2 s before its publish lies above every bound < 2 s.
    assert cumulative[bounds.index(1.0)] <= 1
    assert total >= 2.0
    loop.run()
    assert hub.latency.count == 2  # no flush, nothing pending: nothing observed


def test_stream_duration_is_observed_once_when_it_closes() -> None:
    loop = FakeLoop()
    hub = core.Hub(loop)
    ended, open_ = core.Subscriber(hub, FakeTransport()), core.Subscriber(hub, FakeTransport())
    assert hub.streams_opened == 2 and hub.durations.count == 0
    hub.finish(ended, b"bye")  # finish closes it...
    hub.close(ended)  # ...and detach closes it again: one observation
    assert hub.durations.count == 1 and hub.durations.sum >= 0.0
    assert open_.closed is False
    hub.close(open_)
    assert hub.durations.count == 2
