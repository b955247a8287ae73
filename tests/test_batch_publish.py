"""Batch publish: many messages in one POST /publish (NDJSON, or a JSON array
of {topic, data}), on gochan's own server with the in-memory driver and
behind the ASGI adapter, over real HTTP. Every refusal leaves nothing
published. The drivers' native batches: tests/drivers/test_batch_publish.py."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import httpx
import orjson
import pytest

from gochan import Config, Streamer
from gochan.asgi import GochanASGI
from gochan.drivers import publish_each
from gochan.errors import BatchPublishError, BrokerError, ClosedError
from gochan.ratelimit import RateLimit
from gochan.server import Server
from tests.auth.tokens import PUBLISH_KEY, SECRET, bearer, token
from tests.support import SSEStream, running

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(*messages: Any) -> bytes:
    return b"".join(orjson.dumps(m) + b"\n" for m in messages)


@contextlib.asynccontextmanager
async def served(**options: Any) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    async with running(**options) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            yield server, http


async def subscribed(server: Server, *topics: str) -> SSEStream:
    query = "&".join(f"topic={t}" for t in topics)
    stream = await SSEStream.open(server.port, f"/events?{query}")
    assert (await stream.config())["subscriptions"] == list(topics)
    return stream


async def events(stream: SSEStream, count: int) -> list[tuple[str, str, str]]:
    """The next ``count`` frames as (topic, id, data)."""
    got = []
    for _ in range(count):
        event = await stream.event()
        got.append((event["event"], event["id"], event["data"]))
    return got


# -- what a batch publishes -----------------------------------------------------


async def test_an_ndjson_batch_is_delivered_in_order_with_its_ids() -> None:
    async with served() as (server, http):
        stream = await subscribed(server, "a", "b")
        body = (
            ndjson({"topic": "a", "data": "one"}, {"topic": "b", "data": {"n": 2}})
            + b"\r\n"  # a blank line carries nothing
            + b'{"topic": "nobody-holds-it", "data": "lost"}\r\n'
            + ndjson({"topic": "a", "data": [3]}, {"topic": "b"})
        )
        r = await http.post("/publish", content=body, headers=NDJSON)
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert len(ids) == 5
        assert ids[2] is None  # in memory: nobody held the topic, nothing was sent
        assert all(isinstance(i, str) for i in ids[:2] + ids[3:])
        assert await events(stream, 4) == [
            ("a", ids[0], "one"),
            ("b", ids[1], '{"n":2}'),
            ("a", ids[3], "[3]"),
            ("b", ids[4], ""),
        ]
        assert server.streamer.counters["published"] == 5
        await stream.no_frame()
        await stream.close()


async def test_a_json_array_is_a_batch_and_a_single_object_keeps_its_meaning() -> None:
    async with served() as (server, http):
        stream = await subscribed(server, "a", "b")
        batch = [{"topic": "b", "data": "x"}, {"topic": "a", "data": 1.5}, {"topic": "b"}]
        r = await http.post("/publish", json=batch)
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert await events(stream, 3) == [
            ("b", ids[0], "x"),
            ("a", ids[1], "1.5"),
            ("b", ids[2], ""),
        ]
        r = await http.post("/publish", json={"topic": "a", "data": "single"})
        assert r.status_code == 200 and list(r.json()) == ["id"]
        assert await events(stream, 1) == [("a", r.json()["id"], "single")]
        # With ?topic= the body is one raw message, whatever it looks like.
        raw = b'  [{"topic": "b", "data": "not a batch"}]'
        for headers in ({"Content-Type": "application/json"}, NDJSON):
            r = await http.post("/publish?topic=a", content=raw, headers=headers)
            assert r.status_code == 200 and list(r.json()) == ["id"], r.text
            assert await events(stream, 1) == [("a", r.json()["id"], raw.decode())]
        # No Content-Type at all: an array is a batch too.
        r = await http.post("/publish", content=b'\n [{"topic": "a", "data": "bare"}]')
        assert r.status_code == 200, r.text
        assert await events(stream, 1) == [("a", r.json()["ids"][0], "bare")]
        for empty in (b"[]", b" [ ] "):
            r = await http.post(
                "/publish", content=empty, headers={"Content-Type": "application/json"}
            )
            assert (r.status_code, r.json()) == (200, {"ids": []})
        r = await http.post("/publish", content=b"\n\n", headers=NDJSON)
        assert (r.status_code, r.json()) == (200, {"ids": []})
        await stream.no_frame()
        await stream.close()


async def test_a_full_batch_of_max_batch_messages_passes() -> None:
    async with served(max_batch_messages=50) as (server, http):
        stream = await subscribed(server, "a")
        messages = [{"topic": "a", "data": f"m{n}"} for n in range(50)]
        r = await http.post("/publish", content=ndjson(*messages), headers=NDJSON)
        assert r.status_code == 200, r.text
        got = await events(stream, 50)
        assert [data for _, _, data in got] == [f"m{n}" for n in range(50)]
        assert [i for _, i, _ in got] == r.json()["ids"]
        await stream.close()


# -- refusals: nothing published ---------------------------------------------------

GOOD = {"topic": "a", "data": "fine"}
REFUSALS = [
    # (headers, body, status, what the answer says)
    (NDJSON, ndjson(GOOD) + b"{not json\n", 400, "message 1 (line 2): not JSON"),
    (NDJSON, ndjson(GOOD, GOOD) + b"\n" + ndjson(["a"]), 400, "message 2 (line 4): must be"),
    (NDJSON, ndjson(GOOD, {"topic": 7, "data": "x"}), 400, "message 1 (line 2): must be"),
    (NDJSON, ndjson(GOOD, {"data": "x"}), 400, "message 1 (line 2): must be"),
    (NDJSON, ndjson(GOOD, {"topic": "a\nb"}), 400, "message 1 (line 2): invalid topic"),
    (NDJSON, ndjson(GOOD, GOOD, {"topic": "message"}), 400, "message 2 (line 3): invalid topic"),
    (NDJSON, ndjson(GOOD, {"topic": ""}), 400, "message 1 (line 2): invalid topic"),
    (NDJSON, ndjson(*[GOOD] * 4), 413, "at most 3 messages (max_batch_messages)"),
    ({}, orjson.dumps([GOOD, "a"]), 400, "message 1: must be"),
    ({}, orjson.dumps([GOOD, {"topic": "x" * 300}]), 400, "message 1: invalid topic"),
    ({}, b'[{"topic": "a", "data": "x"}', 400, "malformed JSON array"),
    ({}, orjson.dumps([GOOD] * 4), 413, "at most 3 messages (max_batch_messages)"),
    (NDJSON, ndjson(*[GOOD] * 3) + b" " * 2000, 413, "too large"),
]


@pytest.mark.parametrize(("headers", "body", "status", "says"), REFUSALS)
async def test_a_refused_batch_publishes_nothing(
    headers: dict[str, str], body: bytes, status: int, says: str
) -> None:
    async with served(max_batch_messages=3, max_body_bytes=2048) as (server, http):
        stream = await subscribed(server, "a")
        r = await http.post("/publish", content=body, headers=headers)
        assert r.status_code == status, r.text
        assert says in r.text, r.text
        assert server.streamer.counters["published"] == 0
        assert server.streamer.stats()["driver"]["published"] == 0
        await stream.no_frame()
        await stream.close()


async def test_a_batch_on_a_closed_driver_is_503_with_no_ids() -> None:
    async with served() as (server, http):
        stream = await subscribed(server, "a")
        await server.streamer.driver.close()
        r = await http.post("/publish", json=[GOOD, GOOD])
        assert r.status_code == 503, r.text
        answer = r.json()
        assert answer["ids"] == []
        assert "publish failed at message 0" in answer["error"]
        assert "not connected" in answer["error"]
        await stream.no_frame()
        await stream.close()


# -- authorization: every topic granted, every message counted --------------------


@contextlib.asynccontextmanager
async def authorized(**options: Any) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    async with served(jwt_key=SECRET, publish_key=PUBLISH_KEY, **options) as both:
        yield both


async def test_every_topic_of_a_batch_must_be_granted() -> None:
    async with authorized() as (server, http):
        listener = token("listener", subscribe=["*"])
        stream = await SSEStream.open(server.port, "/events?topic=a&topic=b", bearer(listener))
        assert (await stream.config())["subscriptions"] == ["a", "b"]
        alice = token("alice", publish=["a", "user.*"])
        batch = [GOOD, {"topic": "user.1", "data": "u"}, {"topic": "b", "data": "no"}]
        r = await http.post("/publish", json=batch, headers=bearer(alice))
        assert r.status_code == 403, r.text
        assert "message 2: not allowed to publish to 'b'" in r.text
        assert server.streamer.counters["published"] == 0
        await stream.no_frame()
        r = await http.post("/publish", json=batch[:2], headers=bearer(alice))
        assert r.status_code == 200, r.text
        assert await events(stream, 1) == [("a", r.json()["ids"][0], "fine")]
        # Without a token: the batch is refused as a whole, like a single publish.
        r = await http.post("/publish", json=batch[:1])
        assert r.status_code == 401
        # The publish_key's holder may publish anywhere.
        r = await http.post("/publish", json=batch, headers=bearer(PUBLISH_KEY))
        assert r.status_code == 200, r.text
        assert [t for t, _, _ in await events(stream, 2)] == ["a", "b"]
        await stream.close()


async def test_the_publish_rate_counts_every_message_of_a_batch() -> None:
    async with authorized(publish_rate_per_identity=0.5, publish_burst=3) as (server, http):
        alice = bearer(token("alice", publish=["*"]))
        r = await http.post("/publish", json=[GOOD] * 4, headers=alice)
        assert r.status_code == 413, r.text
        assert "publish_burst=3" in r.text
        assert server.streamer.counters["published"] == 0
        r = await http.post("/publish", json=[GOOD] * 2, headers=alice)
        assert r.status_code == 200, r.text
        # One token left: a batch of two is refused whole, a single publish passes.
        r = await http.post("/publish", json=[GOOD] * 2, headers=alice)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "2 messages" in r.text
        assert server.streamer.counters["published"] == 2
        r = await http.post("/publish", json=GOOD, headers=alice)
        assert r.status_code == 200, r.text
        r = await http.post("/publish", json=[GOOD], headers=alice)
        assert r.status_code == 429, r.text
        # Another identity has its own bucket; the key's holder has none.
        r = await http.post(
            "/publish", json=[GOOD] * 3, headers=bearer(token("bob", publish=["*"]))
        )
        assert r.status_code == 200, r.text
        r = await http.post("/publish", json=[GOOD] * 10, headers=bearer(PUBLISH_KEY))
        assert r.status_code == 200, r.text
        assert server.streamer.counters["published"] == 2 + 1 + 3 + 10
        metrics = (await http.get("/metrics")).text
        assert 'gochan_refusals_total{reason="publish_rate"} 3' in metrics


# -- the ASGI adapter shares the router ------------------------------------------------


async def test_the_asgi_adapter_serves_the_same_batch() -> None:
    from tests.test_asgi import open_stream, serving

    streamer = Streamer(Config(publish_key="s3cret", max_batch_messages=2))
    realtime = GochanASGI(streamer)
    key = {"Authorization": "Bearer s3cret"}
    async with serving(realtime) as app, httpx.AsyncClient(base_url=app.base) as http:
        stream = await open_stream(app, "/events?topic=a")
        await stream.config()
        r = await http.post("/publish", json=[GOOD, GOOD])
        assert r.status_code == 401, r.text  # no key: refused whole
        r = await http.post(
            "/publish", content=ndjson(GOOD, {"topic": "a", "data": "2"}), headers={**NDJSON, **key}
        )
        assert r.status_code == 200, r.text
        ids = r.json()["ids"]
        assert await events(stream, 2) == [("a", ids[0], "fine"), ("a", ids[1], "2")]
        r = await http.post("/publish", json=[GOOD] * 3, headers=key)
        assert r.status_code == 413, r.text
        assert streamer.counters["published"] == 2
        realtime.end_streams()
        await stream.close()


# -- the parts, alone ------------------------------------------------------------------


class TestBatchParts:
    """RateLimit.take(n), publish_each and Streamer.publish_many on drivers
    made for the test (a clock, a driver that fails at a given message)."""

    class Clock:
        def __init__(self) -> None:
            self.now = 100.0

        def __call__(self) -> float:
            return self.now

    class FailingDriver:
        """A broker-like driver without a batch of its own (so the loop of
        publish_each serves it) that fails at message ``fail_at``."""

        name: ClassVar[str] = "failing"
        ready = True

        def __init__(self, fail_at: int) -> None:
            self.fail_at = fail_at
            self.sent: list[tuple[str, bytes]] = []

        def stats(self) -> dict[str, Any]:
            return {}

        def check_topic(self, topic: str) -> None:
            return None

        async def connect(self, receiver: Any) -> None:
            return None

        async def subscribe(self, topic: str) -> None:
            return None

        async def unsubscribe(self, topic: str) -> None:
            return None

        async def publish(self, topic: str, data: bytes) -> str | None:
            if len(self.sent) == self.fail_at:
                raise BrokerError("the broker said no")
            self.sent.append((topic, data))
            return f"id{len(self.sent)}"

        async def close(self) -> None:
            return None

    def test_take_n_is_all_or_none(self) -> None:
        clock = self.Clock()
        rate = RateLimit(10, 5, clock)  # a token every 0.1 s, 5 at once
        assert rate.take("k", 3) == 0.0
        assert rate.take("k", 3) == pytest.approx(0.1)  # 2 left: one more to wait for
        assert rate.take("k", 2) == 0.0  # the refusal took nothing
        assert rate.take("k") == pytest.approx(0.1)
        clock.now += 0.5
        assert rate.take("k", 5) == 0.0
        assert rate.take("k", 6) == float("inf")  # past the burst no wait helps
        assert rate.burst == 5

    async def test_publish_each_stops_at_the_first_failure(self) -> None:
        driver = self.FailingDriver(fail_at=2)
        batch: Sequence[tuple[str, bytes]] = [("a", b"1"), ("b", b"2"), ("c", b"3"), ("d", b"4")]
        with pytest.raises(BatchPublishError) as raised:
            await publish_each(driver, batch)
        assert raised.value.ids == ["id1", "id2"]
        assert (raised.value.total, str(raised.value.error)) == (4, "the broker said no")
        assert "after 2 of 4 messages" in str(raised.value)
        assert driver.sent == [("a", b"1"), ("b", b"2")]  # nothing after the failure
        assert await publish_each(self.FailingDriver(fail_at=9), batch) == [
            "id1",
            "id2",
            "id3",
            "id4",
        ]

    async def test_streamer_publish_many_counts_what_was_published(self) -> None:
        driver = self.FailingDriver(fail_at=1)
        async with Streamer(driver=driver) as streamer:
            with pytest.raises(BatchPublishError) as raised:
                await streamer.publish_many([("a", "x"), ("b", b"y")])
            assert raised.value.ids == ["id1"]
            assert streamer.counters["published"] == 1
            with pytest.raises(ValueError, match="invalid topic"):
                await streamer.publish_many([("a", "x"), ("message", b"y")])
            assert driver.sent == [("a", b"x")]  # the bad topic stopped it before any
        with pytest.raises(ClosedError):
            await streamer.publish_many([("a", "x")])

    async def test_streamer_publish_many_in_memory(self) -> None:
        async with Streamer() as streamer:
            client = await streamer.new_client(topics=["a"])
            ids = await streamer.publish_many([("a", "x"), ("b", "unheld"), ("a", b"z")])
            assert ids[1] is None and ids[0] and ids[2]
            assert len(streamer.history) == 2  # kept for replay: the two that were sent
            assert streamer.counters["published"] == 3
            assert client.topics == ["a"]
