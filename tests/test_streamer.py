"""The embedding API (mirrors the original gochan Streamer)."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time

import pytest

from gochan import (
    ClientExistsError,
    Config,
    InvalidClientIdError,
    InvalidTopicError,
    LimitExceededError,
    MemDriver,
    Streamer,
    UnknownClientError,
)
from gochan._fast import Hub
from gochan.client import SMALL_TOPICS, Client, new_client_id
from gochan.stream import Stream


def test_generated_ids_are_unguessable() -> None:
    ids = {new_client_id() for _ in range(1000)}  # several urandom batches
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{24}", i) for i in ids)  # 18 random bytes, base64url


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_makes_ids_of_its_own() -> None:
    # Ids come from batches of one urandom read: a child that went on with
    # its parent's batch would hand out the ids the parent hands out next.
    new_client_id()  # the parent holds a batch now
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(writer, "".join(new_client_id() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(new_client_id() for _ in range(3))
    assert len(child) == 72 and child != parent


async def test_clients_topics_and_counts() -> None:
    async with Streamer(Config()) as streamer:
        a = await streamer.new_client(["x", "y"])
        b = await streamer.new_custom_client("custom-id_1", ["y"])
        assert streamer.count_clients() == 2
        assert streamer.get_client("custom-id_1") is b
        assert streamer.client_topics(a.id) == ["x", "y"]
        assert await streamer.subscribe(b, ["z", "z"]) == []
        assert streamer.client_topics(b) == ["y", "z"]
        await streamer.unsubscribe(b.id, ["y", "not-held"])
        assert streamer.client_topics(b) == ["z"]
        assert await streamer.remove_client(a.id)
        assert not await streamer.remove_client(a.id)
        assert streamer.get_client(a.id) is None and streamer.count_clients() == 1
        with pytest.raises(UnknownClientError):
            streamer.client_topics(a.id)


async def test_updated_clients_keep_no_lock() -> None:
    """A client's updates run one at a time under a lock that lasts only
    while one is under way or waiting: 1,000 clients updated hold none."""
    async with Streamer(Config()) as streamer:
        clients = [await streamer.new_client(["x"]) for _ in range(1000)]
        await asyncio.gather(
            *(streamer.update_subscriptions(c, add=[f"t{i}"]) for i, c in enumerate(clients))
        )
        assert len(streamer._update_locks) == 0
        assert sorted(streamer.client_topics(clients[7])) == ["t7", "x"]


async def test_custom_client_errors() -> None:
    async with Streamer() as streamer:
        await streamer.new_custom_client("taken")
        with pytest.raises(ClientExistsError):
            await streamer.new_custom_client("taken")
        with pytest.raises(ValueError):  # errors mix in builtins
            await streamer.new_custom_client("taken")
        for bad in ("", "has space", "x" * 129, "new\nline"):
            with pytest.raises(InvalidClientIdError):
                await streamer.new_custom_client(bad)


async def test_invalid_topics_are_refused_and_change_nothing() -> None:
    async with Streamer() as streamer:
        client = await streamer.new_client(["ok"])
        for bad in ("", "a\nb", "nul\x00", "message", "x" * 257, "\u00e9" * 129):
            with pytest.raises(InvalidTopicError):
                await streamer.subscribe(client, ["fine", bad])
        assert client.topics == ["ok"]
        with pytest.raises(InvalidTopicError):
            await streamer.publish("a\rb", b"x")
        assert (await streamer.subscribe(client, ["\u00e9" * 128])) == []  # 256 bytes: allowed


async def test_clients_share_one_instance_of_each_topic_name() -> None:
    # Each request parses its own copy of a name; clients keep the shared one,
    # not 10 strings per connection.
    async with Streamer() as streamer:
        first = "".join(["sp", "ort"])
        second = "".join(["spo", "rt"])
        assert first == second and first is not second
        a = await streamer.new_client(streamer.check_topics([first]))
        b = await streamer.new_client(streamer.check_topics([second]))
        assert a.topics[0] is b.topics[0] is first


async def test_check_topics_refuses_bad_names_among_known_ones() -> None:
    async with Streamer() as streamer:
        assert streamer.check_topics(["a", "b"]) == ["a", "b"]  # now known
        assert streamer.check_topics(t for t in ("b", "a")) == ["b", "a"]  # any iterable
        for bad in (5, None, ["a"], "a\nb"):
            with pytest.raises(InvalidTopicError):
                streamer.check_topics(["a", bad, "b"])


async def test_topic_limit() -> None:
    async with Streamer(Config(max_topics_per_client=3)) as streamer:
        client = await streamer.new_client(["a", "b"])
        with pytest.raises(LimitExceededError):
            await streamer.subscribe(client, ["c", "d"])
        assert client.topics == ["a", "b"]
        # Removes in the same update count: the final set is what is limited.
        await streamer.update_subscriptions(client, add=["c", "d"], remove=["a"])
        assert client.topics == ["b", "c", "d"]


async def test_one_driver_subscription_per_topic() -> None:
    driver = MemDriver()
    async with Streamer(driver=driver) as streamer:
        clients = [await streamer.new_client(["shared"]) for _ in range(5)]
        await streamer.subscribe(clients[0], ["own"])
        assert driver.topics == {"shared", "own"}
        for client in clients[:4]:
            await streamer.remove_client(client)
        assert driver.topics == {"shared"}
        await streamer.unsubscribe(clients[4], ["shared"])
        assert driver.topics == frozenset()


async def test_client_ttl_without_connections() -> None:
    async with Streamer(Config(client_ttl=30)) as streamer:
        client = await streamer.new_client(["t"])
        streamer.tick(time.monotonic() + 29)
        await _settle()
        assert streamer.get_client(client.id) is client
        streamer.tick(time.monotonic() + 31)
        await _settle()
        assert streamer.get_client(client.id) is None
        assert streamer.driver.stats()["subscriptions"] == 0


async def test_a_client_expiring_twice_in_one_tick_counts_once() -> None:
    # Created (one expiry entry), attached and detached (a second entry):
    # both deadlines pass in one tick; it is one client expired, removed once.
    async with Streamer(Config(client_ttl=1)) as streamer:
        client = streamer.create_client()
        stream = streamer.open_stream(client, _NullTransport(), b"")  # type: ignore[arg-type]
        streamer.detach(stream)
        streamer.tick(time.monotonic() + 5)
        assert streamer.get_client(client.id) is None  # at once, not when the task runs
        await _settle()
        assert streamer.counters["clients_expired"] == 1


async def test_only_a_clients_last_ttl_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # A and B start their TTL together; A is attached and detached later,
    # which starts its TTL again. B's deadline passes with A's first one: B
    # goes, A stays until its second; a client with a stream never goes.
    clock = [1000.0]
    monkeypatch.setattr("gochan.streamer.time.monotonic", lambda: clock[0])
    async with Streamer(Config(client_ttl=10)) as streamer:
        a, b, held = (streamer.create_client() for _ in range(3))
        streamer.open_stream(held, _NullTransport(), b"")  # type: ignore[arg-type]
        clock[0] = 1005.0
        streamer.detach(streamer.open_stream(a, _NullTransport(), b""))  # type: ignore[arg-type]
        streamer.tick(1011.0)
        assert streamer.get_client(b.id) is None
        assert streamer.get_client(a.id) is a
        streamer.tick(1014.0)
        assert streamer.get_client(a.id) is a
        streamer.tick(1016.0)
        assert streamer.get_client(a.id) is None
        streamer.tick(5000.0)
        assert streamer.get_client(held.id) is held
        await _settle()
        assert streamer.counters["clients_expired"] == 2


def test_a_client_keeps_its_topics_in_order_past_the_small_size() -> None:
    client = Client("c")
    names = [f"t{i}" for i in range(SMALL_TOPICS + 3)]
    client._add_topics(names[:SMALL_TOPICS] + names[:2])
    assert client.topics == names[:SMALL_TOPICS]
    assert client._remove_topic("t1") and not client._remove_topic("t1")
    client._add_topics(names[SMALL_TOPICS:])  # past the small size: a dict now
    client._add_topic("t1")
    assert client.topics == [n for n in names if n != "t1"] + ["t1"]
    assert client.has_topic("t0") and not client.has_topic("nope")
    assert client._remove_topic("t0") and client.topic_count == SMALL_TOPICS + 2
    assert client.new_topics(["t0", "t2", "t0"]) == ["t0"]


class _NullTransport:
    def get_extra_info(self, name: str) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


async def test_publish_returns_event_id() -> None:
    async with Streamer() as streamer:
        # Nobody holds the topic: nothing is sent, no id.
        assert await streamer.publish("t", b"lost") is None
        await streamer.new_client(["t"])
        first = await streamer.publish("t", b"a")
        second = await streamer.publish("t", "b")
        assert first and second and first != second
        epoch, _, seq = str(second).rpartition("-")
        assert seq == "2" and len(epoch) == 8


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class RoundTripDriver(MemDriver):
    """The in-memory driver with a subscribe of its own, which is then
    awaited, as a broker driver's is (no subscribe_nowait)."""

    async def subscribe(self, topic: str) -> None:
        await asyncio.sleep(0)  # the broker's answer
        await super().subscribe(topic)


async def test_add_held_topics_only_without_waiting_on_the_broker() -> None:
    driver = RoundTripDriver()
    assert driver.subscribe_nowait is None and MemDriver().subscribe_nowait is not None
    async with Streamer(Config(max_topics_per_client=3), driver=driver) as streamer:
        first = await streamer.new_client(["a"])
        client = streamer.create_client()
        assert not streamer.add_held_topics(client, ["a", "b"])  # "b" is not held yet
        assert client.topics == []
        assert streamer.add_held_topics(client, ["a", "a"])
        assert client.topics == ["a"]
        await streamer.remove_client(first)
        assert driver.topics == {"a"}  # still held: the second client counts
        with pytest.raises(LimitExceededError):
            await streamer.subscribe(client, ["b", "c", "d"])
        await streamer.subscribe(client, ["b", "c"])
        other = await streamer.new_client(["x"])
        with pytest.raises(LimitExceededError):
            streamer.add_held_topics(client, ["a", "b", "c", "x"])  # all held, one too many
        assert client.topics == ["a", "b", "c"]
        await streamer.remove_client(client)
        await streamer.remove_client(other)
        assert driver.topics == frozenset()


async def test_add_held_topics_subscribes_in_memory_without_waiting() -> None:
    driver = MemDriver()
    async with Streamer(Config(max_topics_per_client=3), driver=driver) as streamer:
        first = await streamer.new_client(["a"])
        client = streamer.create_client()
        assert streamer.add_held_topics(client, ["a", "b", "b"])  # "b": subscribed now
        assert client.topics == ["a", "b"] and driver.topics == {"a", "b"}
        assert streamer.subscriptions.refs == {"a": 2, "b": 1}
        assert streamer.client_topics(first) == ["a"]
        await streamer.remove_client(client)
        assert driver.topics == {"a"}  # "b" had one holder
        await streamer.remove_client(first)
        assert driver.topics == frozenset()


async def test_a_bare_string_is_not_a_list_of_topics() -> None:
    async with Streamer() as streamer:
        client = await streamer.new_client(["a"])
        for call in (streamer.subscribe, streamer.unsubscribe):
            with pytest.raises(InvalidTopicError, match=r"\[topic\]"):
                await call(client, "news")  # type: ignore[arg-type]
        with pytest.raises(InvalidTopicError):
            await streamer.update_subscriptions(client, add="news")  # type: ignore[arg-type]
        with pytest.raises(InvalidTopicError):
            await streamer.new_client("news")  # type: ignore[arg-type]
        with pytest.raises(InvalidTopicError):
            await streamer.new_custom_client("c2", "news")  # type: ignore[arg-type]
        assert client.topics == ["a"]
        assert streamer.count_clients() == 1  # the refused ones left nothing


def test_a_client_keeps_its_streams_in_order() -> None:
    client = Client("c")
    a, b, c = (object() for _ in range(3))
    for stream in (a, b, c):
        client._add_stream(stream)  # type: ignore[arg-type]
    assert client.streams == (a, b, c)
    assert client._remove_stream(b) and not client._remove_stream(b)  # type: ignore[arg-type]
    assert client.streams == (a, c)
    assert client._remove_stream(a) and client.streams == (c,)  # type: ignore[arg-type]
    client._add_stream(a)  # type: ignore[arg-type]
    assert client._end_streams() == (c, a) and client.streams == ()


def test_an_idle_streams_own_objects_keep_their_sizes() -> None:
    # The 2 KiB per idle connection budget (issue 15) has little slack:
    # a Stream must fit a 160-byte allocation and a Client a 96-byte one
    # (bench/profiles/connection_memory.md). A field added to either shows
    # here before it shows in compare.py's RSS.
    loop = asyncio.new_event_loop()
    try:
        client = Client("x" * 24, "127.0.0.1")
        stream = Stream(Hub(loop), None, client)
        assert sys.getsizeof(stream) <= 160
        assert sys.getsizeof(client) <= 96
        assert stream.paused is False and stream.closed is False  # still bools
        # uvloop's set_protocol keeps the protocol's data_received: one shared
        # function, not a bound method (64 B) made for each stream.
        assert stream.data_received is stream.data_received
        client.closed = client.shared = True
        assert (client.closed, client.shared) == (True, True)
        client.shared = False
        assert (client.closed, client.shared) == (True, False)
    finally:
        loop.close()
