"""Last-Event-ID replay from the in-memory history: exactly the missed
messages, in order, then live, with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Sequence

import httpx
import orjson

from gochan import Config, MemDriver, Streamer
from gochan.history import ENTRY_BYTES, History
from gochan.subscriptions import Subscriptions
from tests.support import SSEStream, running, wait_for


def test_history_bounds_and_floors() -> None:
    entry = ENTRY_BYTES  # what a kept message costs beside its frame
    history = History(max_messages=3, max_bytes=3 * (10 + entry) + 5, max_age_s=10)
    for seq in range(1, 6):
        history.add(seq, "a" if seq % 2 else "b", b"x" * 10, now=0.0)
    assert len(history) == 3 and history.first_seq == 3 and history.bytes == 3 * (10 + entry)
    # 1 (a) and 2 (b) were evicted.
    assert history.complete_after(2, ["a", "b"])
    assert not history.complete_after(1, ["b"])
    assert history.complete_after(1, ["c"])  # nothing of c was ever lost
    assert not history.complete_after(9, ["a"])  # from the future
    assert [r.seq for r in history.after(3)] == [4, 5]
    history.add(6, "a", b"y" * (2 * (10 + entry)), now=0.0)  # the byte bound evicts the rest
    assert [r.seq for r in history.after(0)] == [6] and history.bytes == 2 * (10 + entry) + entry
    history.expire(now=20.0)
    assert len(history) == 0 and history.bytes == 0
    assert not history.complete_after(5, ["a"])


def test_history_release_and_folded_floors() -> None:
    history = History(max_messages=10, max_bytes=10_000, max_age_s=10)
    history.add(1, "a", b"1", now=0.0)
    history.add(2, "b", b"2", now=0.0)
    # Something on "a" was lost here (nobody held it).
    history.mark_gap("a")
    history.add(3, "b", b"3", now=0.0)
    assert not history.complete_after(1, ["a"]) and not history.complete_after(2, ["a"])
    assert history.complete_after(3, ["a"])
    assert history.complete_after(1, ["b"])
    for i in range(5000):  # more topics than floors are kept
        history.mark_gap(f"t{i}")
    assert len(history._floors) <= 4096
    # Folding only makes answers more cautious, never wrongly complete.
    assert not history.complete_after(1, ["a"])


def test_a_topic_held_again_before_its_unsubscribe_is_marked_as_a_gap() -> None:
    # With a broker, a topic nobody holds is still subscribed until its
    # unsubscribe runs; what arrives meanwhile is not kept. A client that
    # holds it again then (hold_now, no await) must not be told a replay
    # across that time is complete.
    history = History(max_messages=10, max_bytes=10_000, max_age_s=10)
    subscriptions = Subscriptions(MemDriver(), history, sees_every_publish=False)
    subscriptions.subscribed.update(dict.fromkeys(("gone", "held")))
    subscriptions.refs["held"] = 1
    history.add(1, "held", b"1", now=0.0)
    assert history.complete_after(1, ["gone"]) and history.complete_after(1, ["held"])
    assert subscriptions.hold_now(["gone", "held"])
    assert subscriptions.refs == {"gone": 1, "held": 2}
    assert not history.complete_after(1, ["gone"])  # nobody held it: a gap
    assert history.complete_after(1, ["held"])  # held all along: none


def test_history_memory_stays_within_its_bound() -> None:
    history = History(max_messages=1_000_000, max_bytes=1_000_000, max_age_s=60)
    rng = random.Random(1)
    for seq in range(1, 50_001):
        history.add(seq, f"t{seq % 100}", b"z" * rng.randrange(10, 200), now=seq / 1000)
        assert history.bytes <= 1_000_000
    assert history.bytes > 900_000 and history.first_seq > 1


async def publish(http: httpx.AsyncClient, port: int, topic: str, body: str) -> str:
    r = await http.post(f"http://127.0.0.1:{port}/publish?topic={topic}", content=body.encode())
    event_id: str = r.json()["id"]
    return event_id


async def test_reconnect_gets_exactly_the_missed_messages_then_live() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        port = server.port
        stream = await SSEStream.open(port, "/events?topic=a&topic=b")
        client_id = (await stream.config())["config"]["client_id"]
        await publish(http, port, "a", "before")
        last = await stream.event()
        assert last["data"] == "before"
        await stream.close()
        missed = [
            (topic, await publish(http, port, topic, f"{topic}{i}"))
            for i, topic in enumerate(["a", "b", "other", "b", "a"])
        ]
        again = await SSEStream.open(port, f"/events?id={client_id}", {"Last-Event-ID": last["id"]})
        await again.config()
        replay = orjson.loads((await again.event())["data"])
        assert replay == {"replay": {"last_event_id": last["id"], "recovered": True}}
        expected = [(t, i) for t, i in missed if t != "other"]
        got = [(e["event"], e["id"]) for e in [await again.event() for _ in expected]]
        assert got == expected
        live_id = await publish(http, port, "b", "live")
        live = await again.event()
        assert (live["id"], live["data"]) == (live_id, "live")
        await again.no_frame(0.2)  # no duplicate of anything
        await again.close()


async def test_last_event_id_query_parameter_and_new_client() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        port = server.port
        stream = await SSEStream.open(port, "/events?topic=q")
        await stream.config()
        first = await publish(http, port, "q", "1")
        await stream.event()
        await stream.close()
        second = await publish(http, port, "q", "2")
        # A fresh client (no id) naming the topic at connect, as a plain
        # EventSource("/events?topic=q") reconnecting does.
        again = await SSEStream.open(port, f"/events?topic=q&last_event_id={first}")
        await again.config()
        assert orjson.loads((await again.event())["data"])["replay"]["recovered"] is True
        event = await again.event()
        assert (event["id"], event["data"]) == (second, "2")
        await again.close()


async def test_messages_nobody_held_are_not_claimed_recovered() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        port = server.port
        stream = await SSEStream.open(port, "/events?topic=gap")
        client_id = (await stream.config())["config"]["client_id"]
        await publish(http, port, "gap", "seen")
        last = (await stream.event())["id"]
        await stream.close()
        await server.streamer.remove_client(client_id)  # nobody holds "gap" now
        r = await http.post(f"http://127.0.0.1:{port}/publish?topic=gap", content=b"lost")
        assert r.json()["id"] is None
        again = await SSEStream.open(port, "/events?topic=gap", {"Last-Event-ID": last})
        await again.config()
        assert orjson.loads((await again.event())["data"])["replay"]["recovered"] is False
        await again.close()


async def test_too_old_or_unknown_ids_are_not_recovered() -> None:
    async with running(history_size=3) as server, httpx.AsyncClient() as http:
        port = server.port
        stream = await SSEStream.open(port, "/events?topic=o")
        client_id = (await stream.config())["config"]["client_id"]
        first = await publish(http, port, "o", "first")
        await stream.close()
        for i in range(5):
            await publish(http, port, "o", f"m{i}")
        for last_id in (first, "ffffffff-1", "garbage", first.split("-")[0] + "-999"):
            again = await SSEStream.open(
                port, f"/events?id={client_id}", {"Last-Event-ID": last_id}
            )
            await again.config()
            replay = orjson.loads((await again.event())["data"])["replay"]
            assert replay == {"last_event_id": last_id, "recovered": False}
            await again.no_frame(0.1)  # nothing is replayed when it cannot be whole
            await again.close()
        assert server.streamer.counters["replay_misses"] == 4


async def test_racing_publishes_during_reconnects_are_neither_lost_nor_doubled() -> None:
    async with running() as server:
        streamer = server.streamer
        port = server.port
        stream = await SSEStream.open(port, "/events?topic=r1&topic=r2")
        client_id = (await stream.config())["config"]["client_id"]
        published: list[str] = []
        stop = asyncio.Event()

        async def publisher() -> None:
            i = 0
            while not stop.is_set():
                event_id = await streamer.publish("r1" if i % 3 else "r2", b"%d" % i)
                assert event_id is not None
                published.append(event_id)
                i += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(publisher())
        received: list[str] = []
        for _ in range(20):
            for _ in range(random.randrange(1, 20)):
                event = await stream.event()
                if event["event"] != "message":
                    received.append(event["id"])
            await stream.close()  # drop mid-flow, resume from the last id seen
            stream = await SSEStream.open(
                port, f"/events?id={client_id}", {"Last-Event-ID": received[-1]}
            )
            await stream.config()
            assert orjson.loads((await stream.event())["data"])["replay"]["recovered"]
        stop.set()
        await task
        while len(received) < len(published):
            received.append((await stream.event())["id"])
        assert received == published  # every message once, in publish order
        await stream.close()


async def test_long_backlog_is_streamed_not_buffered_whole() -> None:
    options = {"max_pending_bytes": 512 * 1024, "history_bytes": 64 * 1024 * 1024}
    async with running(**options) as server:
        streamer = server.streamer
        stream = await SSEStream.open(server.port, "/events?topic=big")
        client_id = (await stream.config())["config"]["client_id"]
        await streamer.publish("big", b"start")
        last = (await stream.event())["id"]
        await stream.close()
        await wait_for(lambda: streamer.hub.connection_count == 0)
        body = b"w" * 10_000
        ids = [await streamer.publish("big", body + b"%d" % i) for i in range(800)]  # 8 MB
        again = await SSEStream.open(
            server.port, f"/events?id={client_id}", {"Last-Event-ID": last}
        )
        await again.config()
        assert orjson.loads((await again.event())["data"])["replay"]["recovered"]
        got = [(await again.event())["id"] for _ in ids]
        assert got == ids
        assert streamer.hub.slow_disconnects == 0  # 8 MB through a 512 KiB bound
        live = await streamer.publish("big", b"live")
        assert (await again.event())["id"] == live
        await again.close()


class ScriptedDurableDriver(MemDriver):
    """A durable driver whose broker is a list, and whose replay lets the
    test deliver live messages in the middle of it (unit-testing the
    streamer's hand-off; NATS JetStream runs it for real in
    tests/drivers/test_nats_replay.py)."""

    durable = True

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, bytes]] = []  # position = index + 1
        self.during_replay: list[int] = []  # positions delivered live mid-replay
        self.stored_during_replay: list[tuple[str, bytes]] = []

    def store(self, topic: str, data: bytes) -> None:
        self.log.append((topic, data))

    def event_position(self, event_id: str) -> int | None:
        return int(event_id[1:]) if event_id.startswith("p") else None

    def deliver(self, position: int) -> None:
        topic, data = self.log[position - 1]
        assert self._receiver is not None
        self._receiver.on_message(topic, data, f"p{position}")

    async def replay(
        self, topics: Sequence[str], after: int
    ) -> AsyncGenerator[tuple[str, bytes, str], None]:
        end = len(self.log)
        for position in range(after + 1, end + 1):
            topic, data = self.log[position - 1]
            if topic in topics:
                yield topic, data, f"p{position}"
            if position == after + 1:
                # Live delivery overtakes the replay: messages it will also
                # read (duplicates to drop) and one stored after it began,
                # past its end (to keep).
                for item in self.stored_during_replay:
                    self.store(*item)
                for live in self.during_replay:
                    self.deliver(live)
                await asyncio.sleep(0)


async def test_durable_hand_off_drops_duplicates_and_keeps_what_follows() -> None:
    driver = ScriptedDurableDriver()
    streamer = Streamer(Config(port=0), driver=driver)
    await streamer.start()
    server = await streamer.serve()
    try:
        for i in range(1, 6):
            driver.store("d", b"m%d" % i)  # positions 1..5 stored while away
        driver.stored_during_replay = [("d", b"m6")]
        driver.during_replay = [4, 5, 6]
        stream = await SSEStream.open(server.port, "/events?topic=d", {"Last-Event-ID": "p1"})
        await stream.config()
        assert (await stream.event())["data"] == orjson.dumps(
            {"replay": {"last_event_id": "p1", "recovered": True}}
        ).decode()
        got = [await stream.event() for _ in range(5)]
        assert [e["id"] for e in got] == ["p2", "p3", "p4", "p5", "p6"]
        assert [e["data"] for e in got] == ["m2", "m3", "m4", "m5", "m6"]
        driver.store("d", b"m7")
        driver.deliver(7)  # live after the hand-off
        assert (await stream.event())["id"] == "p7"
        await stream.no_frame(0.2)
        await stream.close()
    finally:
        await streamer.close()


async def test_live_frames_held_during_a_replay_go_out_in_position_order() -> None:
    """Two topics' live subscriptions may deliver out of publish order while
    a broker replay runs (seen with JetStream's per-subject consumers): the
    held frames are sent in position order."""
    driver = ScriptedDurableDriver()
    streamer = Streamer(Config(port=0), driver=driver)
    await streamer.start()
    server = await streamer.serve()
    try:
        driver.store("a", b"m1")
        driver.store("b", b"m2")  # replayed
        driver.stored_during_replay = [("a", b"m3"), ("b", b"m4")]
        driver.during_replay = [4, 3]  # live, swapped
        stream = await SSEStream.open(
            server.port, "/events?topic=a&topic=b", {"Last-Event-ID": "p1"}
        )
        await stream.config()
        await stream.event()  # the replay answer
        got = [(await stream.event())["id"] for _ in range(3)]
        assert got == ["p2", "p3", "p4"]
        await stream.no_frame(0.2)
        await stream.close()
    finally:
        await streamer.close()


class _IdGivingDriver(MemDriver):
    """In memory, but passing its own message ids as SQS or Pub/Sub do:
    ids gochan cannot resume from."""

    name = "id-giving"

    def publish_nowait(self, topic: str, data: bytes) -> str | None:
        receiver = self._receiver
        assert receiver is not None
        self.published += 1
        if topic in self._topics:
            return receiver.on_message(topic, data, f"broker-msg-{random.getrandbits(64):x}")
        return None


async def test_a_driver_that_cannot_replay_still_gets_replay_from_memory() -> None:
    async with Streamer(Config(port=0), driver=_IdGivingDriver()) as streamer:
        server = await streamer.serve()
        port = server.port
        async with httpx.AsyncClient() as http:
            stream = await SSEStream.open(port, "/events?topic=a")
            client_id = (await stream.config())["config"]["client_id"]
            await publish(http, port, "a", "before")
            last = await stream.event()
            await stream.close()
            missed = [await publish(http, port, "a", f"m{i}") for i in range(3)]
            again = await SSEStream.open(
                port, f"/events?id={client_id}", {"Last-Event-ID": last["id"]}
            )
            await again.config()
            replay = orjson.loads((await again.event())["data"])
            assert replay["replay"]["recovered"] is True, replay
            assert [(await again.event())["id"] for _ in missed] == missed
            await again.close()
