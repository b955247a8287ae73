"""The ASGI adapter under a real uvicorn server: the FastAPI example (its login
turned into per-topic grants by an authorize hook, gochan under /realtime), a
plain Starlette Mount, GochanASGI as the whole app, and answers compared with
gochan's own server request by request."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from gochan import Client, Config, MemDriver, Streamer
from gochan.asgi import GochanASGI
from gochan.errors import BrokerError
from gochan.stream import Stream
from tests.support import SSEStream, closing_retry, running, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fastapi_app.py"

ALICE = {"Authorization": "Bearer alice-token"}  # may publish
BOB = {"Authorization": "Bearer bob-token"}  # may only listen


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastapi_app_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pydantic resolve names through it
    spec.loader.exec_module(module)
    return module


example = load_example()
USERS = example.parse_tokens(example.DEMO_TOKENS)


class Served:
    def __init__(self, port: int, app: Any) -> None:
        self.port = port
        self.app = app
        self.base = f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[Served]:
    """``app`` under uvicorn (httptools, lifespan on) on a free port, in this loop."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http="httptools",
        ws="none",
        lifespan="on",
        log_config=None,
        log_level="critical",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=3,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started or task.done())
    if task.done():
        task.result()
        raise AssertionError("uvicorn did not start")
    try:
        yield Served(port, app)
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def fastapi_example(**config: Any) -> AsyncIterator[Served]:
    streamer = Streamer(Config(**config))
    async with serving(example.create_app(USERS, streamer)) as served:
        yield served


def hub_of(served: Served) -> Any:
    return served.app.state.streamer.hub


class ChunkedStream(SSEStream):
    """SSEStream for a chunked response (uvicorn's framing of a stream without
    a length): the SSE bytes are de-chunked, otherwise kept exactly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.raw = bytearray()
        self.ended = False  # the last chunk arrived

    async def read_body(self, timeout: float = 5.0) -> bytes:
        """The next de-chunked bytes; b"" at the end of the response or EOF."""
        assert self.headers.get("transfer-encoding") == "chunked", self.headers
        while True:
            size_end = self.raw.find(b"\r\n")
            if size_end >= 0:
                size = int(self.raw[:size_end], 16)
                if size == 0:
                    self.ended = self.raw.startswith(b"0\r\n\r\n") or self.ended
                    if self.ended:
                        return b""
                elif len(self.raw) >= size_end + 2 + size + 2:
                    start = size_end + 2
                    data = bytes(self.raw[start : start + size])
                    assert self.raw[start + size : start + size + 2] == b"\r\n"
                    del self.raw[: start + size + 2]
                    return data
            more = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not more:
                return b""
            self.raw += more

    async def frame(self, timeout: float = 5.0) -> bytes:
        while b"\n\n" not in self.buffer:
            data = await self.read_body(timeout)
            if not data:
                raise EOFError(f"stream ended; unparsed: {self.buffer!r}")
            self.buffer += data
        frame, _, self.buffer = self.buffer.partition(b"\n\n")
        return frame + b"\n\n"

    async def until_end(self, timeout: float = 5.0) -> bytes:
        """Everything left, up to the end of the response."""
        rest = self.buffer
        self.buffer = b""
        while data := await self.read_body(timeout):
            rest += data
        return rest


async def open_stream(
    served: Served, target: str, headers: dict[str, str] | None = None
) -> ChunkedStream:
    stream = await ChunkedStream.open(served.port, target, headers)
    assert stream.status == 200, (stream.head, await stream.reader.read(4096))
    return stream


def drop_id(frame: bytes) -> bytes:
    return re.sub(rb"\nid: [^\n]+", b"\nid: *", frame)


# -- the FastAPI example ---------------------------------------------------


async def test_stream_head_and_first_frame_as_gochan_sends_them() -> None:
    async with fastapi_example() as served, running() as raw:
        ours = await open_stream(served, "/realtime/events?topic=news&topic=public.b", BOB)
        theirs = await SSEStream.open(raw.port, "/events?topic=news&topic=public.b")
        for name in ("content-type", "cache-control", "connection", "x-accel-buffering", "server"):
            assert ours.headers[name] == theirs.headers[name], name
        assert ours.headers["server"] == "gochan"
        assert "content-length" not in ours.headers
        first = await ours.frame()
        (client_id,) = served.app.state.streamer._clients
        assert first == (
            b'event: message\ndata: {"config":{"client_id":"%s","client_ttl_millis":60000},'
            b'"subscriptions":["news","public.b"]}\n\n' % client_id.encode()
        )
        (raw_id,) = raw.streamer._clients
        assert await theirs.frame() == first.replace(client_id.encode(), raw_id.encode())
        await ours.close()
        await theirs.close()


async def test_publish_multiline_form_and_json() -> None:
    async with fastapi_example() as served, httpx.AsyncClient(base_url=served.base) as http:
        stream = await open_stream(served, "/realtime/events?topic=public.a", BOB)
        await stream.config()
        r = await http.post(
            "/realtime/publish",
            params={"topic": "public.a"},
            content=b"l1\r\nl2\nl3",
            headers=ALICE,
        )
        assert r.status_code == 200
        event_id = r.json()["id"]
        assert await stream.frame() == (
            b"event: public.a\nid: %s\ndata: l1\ndata: l2\ndata: l3\n\n" % event_id.encode()
        )
        await http.post(
            "/realtime/publish", data={"topic": "public.a", "data": "form"}, headers=ALICE
        )
        await http.post(
            "/realtime/publish", json={"topic": "public.a", "data": {"n": 1}}, headers=ALICE
        )
        assert (await stream.event())["data"] == "form"
        assert (await stream.event())["data"] == '{"n":1}'
        # The app's own route publishes through the embedding API.
        r = await http.post("/api/announce", json={"text": "hi"}, headers=ALICE)
        assert r.status_code == 200
        await stream.no_frame()  # not subscribed to announcements
        await stream.close()


async def test_update_subscriptions_add_remove_and_refusals() -> None:
    async with (
        fastapi_example(max_body_bytes=4096) as served,
        httpx.AsyncClient(base_url=served.base, headers=BOB) as http,
    ):
        stream = await open_stream(served, "/realtime/events", BOB)
        client_id = (await stream.config())["config"]["client_id"]
        url = "/realtime/update_subscriptions"
        r = await http.post(
            url, json={"client_id": client_id, "add": ["public.x", "public.y", "public.x"]}
        )
        assert r.status_code == 200
        assert r.json() == {
            "client_id": client_id,
            "subscriptions": ["public.x", "public.y"],
            "errors": [],
        }
        streamer = served.app.state.streamer
        await streamer.publish("public.x", b"to x")
        assert (await stream.event())["data"] == "to x"
        r = await http.post(
            url, json={"client_id": client_id, "add": ["public.z"], "remove": ["public.x"]}
        )
        assert r.json()["subscriptions"] == ["public.y", "public.z"]
        # No message for a removed topic after the response.
        await streamer.publish("public.x", b"gone")
        await streamer.publish("public.z", b"to z")
        assert (await stream.event())["data"] == "to z"

        refusals = [
            (b"not json", 400, "malformed JSON body"),
            (b"[]", 400, "the body must be a JSON object"),
            (b"{}", 400, "missing client_id"),
            (
                b'{"client_id":"%s","add":"public.x"}' % client_id.encode(),
                400,
                "add must be a list",
            ),
            (b'{"client_id":"nobody","add":["public.x"]}', 400, "Invalid Client ID"),
            (b'{"client_id":"%s","add":["a\\nb"]}' % client_id.encode(), 400, "topic"),
            (b'{"client_id":"%s","add":["message"]}' % client_id.encode(), 400, "reserved"),
            (b"{" + b" " * 5000 + b"}", 413, "request body too large"),
        ]
        for body, status, text in refusals:
            r = await http.post(url, content=body, headers={"Content-Type": "application/json"})
            assert (r.status_code, text in r.text) == (status, True), (body[:40], r.text)
        r = await http.get(url)
        assert (r.status_code, r.headers["allow"]) == (405, "POST, OPTIONS")
        r = await http.options(url)
        assert (r.status_code, r.headers["allow"]) == (204, "POST, OPTIONS")
        await stream.close()


class FlakyDriver(MemDriver):
    """The broker refuses topics whose name starts with 'public.down'."""

    async def subscribe(self, topic: str) -> None:
        if topic.startswith("public.down"):
            raise BrokerError(f"broker refused {topic}")
        await super().subscribe(topic)


async def test_broker_failures_are_reported_per_topic() -> None:
    streamer = Streamer(Config(), driver=FlakyDriver())
    async with (
        serving(example.create_app(USERS, streamer)) as served,
        httpx.AsyncClient(base_url=served.base, headers=BOB) as http,
    ):
        stream = await open_stream(
            served, "/realtime/events?topic=public.down0&topic=public.ok", BOB
        )
        config = await stream.config()
        assert config["subscriptions"] == ["public.ok"]
        assert b'"topic":"public.down0"' in await stream.frame()
        r = await http.post(
            "/realtime/update_subscriptions",
            json={"client_id": config["config"]["client_id"], "add": ["public.up", "public.down1"]},
        )
        assert r.status_code == 200
        assert r.json()["errors"] == [
            {
                "topic": "public.down1",
                "code": "subscription-failure",
                "message": "broker refused public.down1",
            }
        ]
        assert await stream.frame() == (
            b'event: message\ndata: {"error":{"code":"subscription-failure",'
            b'"message":"broker refused public.down1","topic":"public.down1"}}\n\n'
        )
        await stream.close()


async def test_several_connections_of_one_client_each_get_everything() -> None:
    async with fastapi_example() as served:
        streamer = served.app.state.streamer
        client = await streamer.new_client(["public.t"], identity="bob")
        streams = [await open_stream(served, f"/realtime/events?id={client.id}", BOB)]
        streams.append(await open_stream(served, f"/realtime/events?id={client.id}", BOB))
        for stream in streams:
            assert (await stream.config())["config"]["client_id"] == client.id
        await wait_for(lambda: len(client.streams) == 2)
        for n in range(3):
            await streamer.publish("public.t", f"m{n}")
        for stream in streams:
            assert [(await stream.event())["data"] for _ in range(3)] == ["m0", "m1", "m2"]
        # Removing the client ends every stream with "Client closed" and the response.
        assert await streamer.remove_client(client)
        for stream in streams:
            assert await stream.frame() == b"event: message\ndata: Client closed\n\n"
            assert await stream.until_end() == b""
            assert stream.ended
            await stream.close()
        assert hub_of(served).connection_count == 0


async def test_unknown_client_and_bad_queries() -> None:
    async with (
        fastapi_example() as served,
        httpx.AsyncClient(base_url=served.base, headers=BOB) as http,
    ):
        r = await http.get("/realtime/events", params={"id": "nobody"})
        assert (r.status_code, r.text) == (401, "Invalid client ID\n")
        assert (await http.get("/realtime/events", params={"id": "a b"})).status_code == 400
        assert (await http.get("/realtime/events", params={"topic": ""})).status_code == 400
        r = await http.head("/realtime/events")
        assert (r.status_code, r.headers["content-type"]) == (200, "text/event-stream")
        assert r.content == b""
        assert (await http.get("/realtime/nope")).status_code == 404
        r = await http.get("/realtime/healthz")
        assert (r.status_code, r.text, r.headers["server"]) == (200, "ok\n", "gochan")
        assert "gochan_streams 0.0" in (await http.get("/realtime/metrics")).text


async def test_authentication_in_front_of_gochan() -> None:
    async with fastapi_example() as served, httpx.AsyncClient(base_url=served.base) as http:
        guarded = [
            ("GET", "/realtime/events?topic=news"),
            ("HEAD", "/realtime/events"),
            ("POST", "/realtime/update_subscriptions"),
            ("POST", "/realtime/publish?topic=news"),
        ]
        for method, path in guarded:
            # No login: the authorize hook refuses, as gochan refuses a missing token.
            r = await http.request(method, path, content=b"{}")
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Bearer"), path
            if method != "HEAD":
                assert r.text == "login required\n", path
            # A session cookie nobody issued, or a forged token: the app's middleware.
            for forged in ({"Authorization": "Bearer forged"}, {"Cookie": "session=forged"}):
                r = await http.request(method, path, content=b"{}", headers=forged)
                assert r.status_code == 401, (path, forged)
        metrics = (await http.get("/realtime/metrics")).text
        assert 'gochan_refusals_total{reason="unauthorized"} 4.0' in metrics, metrics
        # CORS preflights carry no credentials: they reach gochan.
        assert (await http.options("/realtime/publish")).status_code == 204
        assert served.app.state.streamer.count_clients() == 0
        assert served.app.state.streamer.counters["published"] == 0

        # A browser logs in once; EventSource then sends the cookie.
        assert (await http.post("/login", json={"token": "nope"})).status_code == 401
        r = await http.post("/login", json={"token": "bob-token"})
        assert r.status_code == 204
        cookie = r.cookies["session"]
        assert (await http.get("/api/me")).json() == {"name": "bob", "permissions": []}
        stream = await open_stream(
            served, "/realtime/events?topic=announcements", {"Cookie": f"session={cookie}"}
        )
        await stream.config()
        http.cookies.clear()
        r = await http.post("/api/announce", json={"text": "hello"}, headers=ALICE)
        assert r.status_code == 200
        event = await stream.event()
        assert (event["event"], event["data"], event["id"]) == (
            "announcements",
            "alice: hello",
            r.json()["id"],
        )
        await stream.close()


async def test_only_publishers_publish() -> None:
    async with fastapi_example() as served, httpx.AsyncClient(base_url=served.base) as http:
        stream = await open_stream(served, "/realtime/events?topic=news&topic=user.bob.inbox", BOB)
        await stream.config()
        # Bob may listen, but publishes nowhere over HTTP, not even to his own topics.
        for topic in ("news", "user.bob.inbox"):
            r = await http.post(
                "/realtime/publish", params={"topic": topic}, content=b"x", headers=BOB
            )
            assert (r.status_code, r.text) == (403, f"not allowed to publish to {topic!r}\n")
        r = await http.post("/api/announce", json={"text": "x"}, headers=BOB)
        assert r.status_code == 403
        assert served.app.state.streamer.counters["published"] == 0
        # Alice publishes to the public topics and her own, not into Bob's.
        r = await http.post("/realtime/publish?topic=user.bob.inbox", content=b"x", headers=ALICE)
        assert (r.status_code, r.text) == (403, "not allowed to publish to 'user.bob.inbox'\n")
        r = await http.post("/realtime/publish?topic=news", content=b"from alice", headers=ALICE)
        assert r.status_code == 200
        r = await http.post("/realtime/publish?topic=user.alice.notes", content=b"x", headers=ALICE)
        assert r.status_code == 200
        # The only frame Bob's stream gets is the one publish allowed to his topics.
        event = await stream.event()
        assert (event["event"], event["data"]) == ("news", "from alice")
        await stream.no_frame()
        await stream.close()


async def test_private_topics_reach_only_their_owner() -> None:
    """The issue's report: logged-in Bob subscribed to Alice's private topic
    and received its message. Now the hook grants each user only their own."""
    async with fastapi_example() as served, httpx.AsyncClient(base_url=served.base) as http:
        streamer = served.app.state.streamer
        # At connect: 403, and nothing is created.
        for query in (
            "topic=user.alice.inbox",
            "topic=news&topic=user.alice.inbox",
            "topic=user.*",
        ):
            r = await http.get(f"/realtime/events?{query}", headers=BOB)
            assert r.status_code == 403, query
            assert r.text.startswith("not allowed to subscribe to"), r.text
        assert streamer.count_clients() == 0

        # Alice logs in with the cookie, as her browser would, and reads her inbox.
        r = await http.post("/login", json={"token": "alice-token"})
        alice_cookie = {"Cookie": f"session={r.cookies['session']}"}
        http.cookies.clear()
        alice = await open_stream(served, "/realtime/events?topic=user.alice.inbox", alice_cookie)
        assert (await alice.config())["subscriptions"] == ["user.alice.inbox"]

        bob = await open_stream(served, "/realtime/events?topic=user.bob.inbox", BOB)
        bob_id = (await bob.config())["config"]["client_id"]
        # By update: Alice's topics are refused as forbidden, the rest applies.
        r = await http.post(
            "/realtime/update_subscriptions",
            json={"client_id": bob_id, "add": ["user.alice.inbox", "news", "user.alice.x"]},
            headers=BOB,
        )
        assert r.status_code == 200
        body = r.json()
        assert body["subscriptions"] == ["user.bob.inbox", "news"]
        assert [(e["topic"], e["code"]) for e in body["errors"]] == [
            ("user.alice.inbox", "forbidden"),
            ("user.alice.x", "forbidden"),
        ]
        assert served.app.state.streamer.hub.subscriber_count("user.alice.inbox") == 1

        # Bob writes to Alice through the app; the app writes to Bob.
        r = await http.post("/api/messages", json={"to": "alice", "text": "psst"}, headers=BOB)
        assert r.status_code == 200
        sent = r.json()["id"]
        r = await http.post("/api/messages", json={"to": "nobody", "text": "?"}, headers=BOB)
        assert r.status_code == 404
        to_bob = await streamer.publish("user.bob.inbox", "for bob")
        event = await alice.event()
        assert (event["event"], event["data"], event["id"]) == (
            "user.alice.inbox",
            "bob: psst",
            sent,
        )
        # Bob's first frame after the update is his own message: Alice's never came.
        event = await bob.event()
        assert (event["event"], event["data"], event["id"]) == ("user.bob.inbox", "for bob", to_bob)
        await bob.no_frame()
        await alice.no_frame()
        await alice.close()
        await bob.close()


async def test_a_client_id_belongs_to_its_user() -> None:
    async with fastapi_example() as served, httpx.AsyncClient(base_url=served.base) as http:
        streamer = served.app.state.streamer
        alice = await open_stream(served, "/realtime/events?topic=user.alice.inbox", ALICE)
        alice_id = (await alice.config())["config"]["client_id"]
        gone = await streamer.new_client(identity="alice")  # a valid id nobody holds now
        assert await streamer.remove_client(gone)

        def answer(r: httpx.Response) -> tuple[int, str, list[tuple[str, str]]]:
            return r.status_code, r.text, sorted(h for h in r.headers.items() if h[0] != "date")

        # Bob presenting Alice's id gets exactly what an unknown id gets.
        theirs = await http.get("/realtime/events", params={"id": alice_id}, headers=BOB)
        unknown = await http.get("/realtime/events", params={"id": gone.id}, headers=BOB)
        assert answer(theirs) == answer(unknown)
        assert (theirs.status_code, theirs.text) == (401, "Invalid client ID\n")
        url = "/realtime/update_subscriptions"
        theirs = await http.post(url, json={"client_id": alice_id, "add": ["news"]}, headers=BOB)
        unknown = await http.post(url, json={"client_id": gone.id, "add": ["news"]}, headers=BOB)
        assert answer(theirs) == answer(unknown)
        assert (theirs.status_code, theirs.text) == (400, "Invalid Client ID\n")
        theirs = await http.post(
            url, json={"client_id": alice_id, "remove": ["user.alice.inbox"]}, headers=BOB
        )
        assert answer(theirs) == answer(unknown)
        # Without a login the id is worth nothing either.
        r = await http.get("/realtime/events", params={"id": alice_id})
        assert r.status_code == 401
        # Alice's client is untouched: her topics, one stream, and it still delivers.
        client = streamer.get_client(alice_id)
        assert client.topics == ["user.alice.inbox"] and len(client.streams) == 1
        await streamer.publish("user.alice.inbox", "still mine")
        assert (await alice.event())["data"] == "still mine"
        # Alice herself reconnects with her id.
        again = await open_stream(served, f"/realtime/events?id={alice_id}", ALICE)
        assert (await again.config())["config"]["client_id"] == alice_id
        await again.close()
        await alice.close()


def test_user_names_cannot_reach_into_other_users_topics() -> None:
    # "bob.x" would own user.bob.x.*, which bob's user.bob.* already covers.
    for spec in ("t=bob.x", "t=a*", "t=", "=bob", "t=bob b"):
        with pytest.raises(ValueError, match="bad token entry"):
            example.parse_tokens(spec)
    users = example.parse_tokens("t1=bob, t2=carol:publish")
    assert sorted(u.name for u in users.values()) == ["bob", "carol"]
    grant = example.grant_for(users["t1"])
    assert grant.subscribe.allows("user.bob.inbox") and grant.subscribe.allows("public.x")
    assert not grant.subscribe.allows("user.bobby.inbox") and not grant.publish
    assert example.grant_for(users["t2"]).publish.allows("user.carol.inbox")


async def test_disconnect_detaches_the_stream_and_starts_the_ttl() -> None:
    async with fastapi_example() as served:
        hub = hub_of(served)
        realtime: GochanASGI = served.app.state.realtime
        stream = await open_stream(served, "/realtime/events?topic=public.t", BOB)
        client_id = (await stream.config())["config"]["client_id"]
        client: Client = served.app.state.streamer.get_client(client_id)
        assert hub.connection_count == 1 and hub.subscriber_count("public.t") == 1
        assert client.expires_at is None and realtime.metrics.connections == 1
        await stream.close()
        await wait_for(lambda: hub.connection_count == 0)
        assert hub.subscriber_count("public.t") == 0 and not client.streams
        assert client.expires_at is not None  # the client lives on for its TTL
        await wait_for(lambda: realtime.metrics.connections == 0)
        # It reconnects within the TTL and keeps its topics.
        again = await open_stream(served, f"/realtime/events?id={client_id}", BOB)
        assert (await again.config())["subscriptions"] == ["public.t"]
        await again.close()


async def test_last_event_id_is_answered_as_gochan_does() -> None:
    async with fastapi_example() as served, running() as raw:
        headers = {**BOB, "Last-Event-ID": "abc-1"}
        ours = await open_stream(served, "/realtime/events", headers)
        theirs = await SSEStream.open(raw.port, "/events", {"Last-Event-ID": "abc-1"})
        await ours.config()
        await theirs.config()
        replay = await ours.frame()
        assert replay == await theirs.frame()
        assert orjson.loads(replay.split(b"data: ")[1]) == {
            "replay": {"last_event_id": "abc-1", "recovered": False}
        }
        await ours.close()
        await theirs.close()


async def test_heartbeats_reach_idle_streams() -> None:
    async with fastapi_example(heartbeat=0.2) as served:
        stream = await open_stream(served, "/realtime/events", BOB)
        await stream.config()
        assert await stream.frame(timeout=3) == b":\n\n"
        await stream.close()


def own_streams(realtime: GochanASGI) -> list[Stream]:
    """The open streams this adapter serves."""
    hub = realtime.streamer.hub
    return [s for s in hub.open_subscribers() if getattr(s, "front_end", None) is realtime]


async def test_slow_consumer_is_dropped_and_others_get_everything() -> None:
    options = {"max_pending_bytes": 1 << 20, "write_buffer_high_bytes": 16 * 1024}
    async with fastapi_example(**options) as served:
        hub = hub_of(served)
        streamer = served.app.state.streamer
        realtime: GochanASGI = served.app.state.realtime
        slow = await open_stream(served, "/realtime/events?topic=public.flood", BOB)
        await slow.config()
        fast = await open_stream(served, "/realtime/events?topic=public.flood", BOB)
        await fast.config()
        body = b"x" * 10_000
        received = bytearray(fast.buffer)
        most_pending = 0

        async def drain() -> None:
            nonlocal most_pending
            frames = 0
            while frames < 2000:
                data = await fast.read_body()
                assert data
                # Count frame ends in the new bytes only (one may straddle reads).
                start = max(0, len(received) - 1)
                received.extend(data)
                frames += received.count(b"\n\n", start)
                pending = [s.pending_bytes for s in own_streams(realtime)]
                most_pending = max([most_pending, *pending])

        reader = asyncio.create_task(drain())
        for n in range(2000):  # 20 MB: far more than the socket buffers hold
            await streamer.publish("public.flood", body)
            await asyncio.sleep(0.001 if n % 10 == 0 else 0)
        await asyncio.wait_for(reader, 20)
        await wait_for(lambda: hub.slow_disconnects == 1)
        assert hub.subscriber_count("public.flood") == 1 and len(own_streams(realtime)) == 1
        assert most_pending <= options["max_pending_bytes"]
        assert received.count(b"data: " + body) == 2000
        await fast.close()
        await slow.close()
        await wait_for(lambda: realtime.metrics.connections == 0)


async def test_reader_that_stalls_then_catches_up_gets_every_frame_in_order() -> None:
    async with fastapi_example(max_pending_bytes=64 << 20) as served:
        streamer = served.app.state.streamer
        stream = await open_stream(served, "/realtime/events?topic=public.big", BOB)
        await stream.config()
        body = b"y" * 20_000
        for i in range(1000):  # 20 MB while nobody reads
            await streamer.publish("public.big", b"%06d" % i + body)
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        (sub,) = hub_of(served).open_subscribers()
        assert sub.paused and sub.pending_bytes > 1_000_000  # held in gochan's queue
        for seen in range(1000):
            assert (await stream.event())["data"] == f"{seen:06d}" + body.decode()
        assert hub_of(served).slow_disconnects == 0
        await stream.close()


async def test_shutdown_on_sigterm_sends_client_closed() -> None:
    """uvicorn waits for open responses before the lifespan ends: the adapter
    ends its streams when the signal arrives, so the server exits promptly."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "EXAMPLE_TOKENS": "t1=carol"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uvicorn", "examples.fastapi_app:app", "--port", str(port),
        "--no-server-header", "--ws", "none", "--no-access-log",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        served = Served(port, None)
        for _ in range(200):
            with contextlib.suppress(OSError):
                stream = await open_stream(
                    served, "/realtime/events?topic=user.carol.x", {"Authorization": "Bearer t1"}
                )
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("uvicorn did not start")
        await stream.config()
        proc.send_signal(signal.SIGTERM)
        closing_retry(await stream.closing())
        assert await stream.until_end() == b"" and stream.ended
        # uvicorn exits by raising the signal again once it has shut down.
        assert await asyncio.wait_for(proc.wait(), 10) in (0, -signal.SIGTERM)
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "Application shutdown complete" in log and "ERROR" not in log, log
        await stream.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- plain Starlette, GochanASGI alone ---------------------------------------


async def test_starlette_mount_keeps_the_publish_key() -> None:
    streamer = Streamer(Config(publish_key="s3cret"))
    realtime = GochanASGI(streamer)
    app = Starlette(routes=[Mount("/a/b", app=realtime)], lifespan=realtime.lifespan)
    async with serving(app) as served, httpx.AsyncClient(base_url=served.base) as http:
        stream = await open_stream(served, "/a/b/events?topic=k")
        await stream.config()
        url = "/a/b/publish?topic=k"
        r = await http.post(url, content=b"x")
        assert (r.status_code, r.headers["www-authenticate"]) == (401, 'Bearer realm="gochan"')
        r = await http.post(url, content=b"x", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.post(url, content=b"yes", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        assert drop_id(await stream.frame()) == b"event: k\nid: *\ndata: yes\n\n"
        assert (await http.get("/a/b/nope")).status_code == 404
        assert (await http.get("/a/events")).status_code == 404  # Starlette's own 404
        await stream.close()


async def test_without_a_key_nobody_publishes_unless_the_host_decides() -> None:
    # gochan's server lets loopback-only listeners publish without a key; the
    # adapter cannot see how the app is exposed, so it refuses.
    for required, status in [(True, 403), (False, 200)]:
        realtime = GochanASGI(Streamer(Config()), publish_key_required=required)
        async with serving(realtime) as served, httpx.AsyncClient(base_url=served.base) as http:
            r = await http.post("/publish?topic=a", content=b"x")
            assert r.status_code == status, r.text
            if required:
                assert "publish_key_required=False" in r.text


async def test_gochan_asgi_as_the_whole_app_runs_its_own_lifespan() -> None:
    streamer = Streamer(Config(retry_ms=1500))
    realtime = GochanASGI(streamer, publish_key_required=False)
    async with serving(realtime) as served:
        assert streamer.started
        stream = await open_stream(served, "/events?topic=w")
        assert (await stream.frame()).startswith(b"retry: 1500\nevent: message\n")
        await streamer.publish("w", b"1")
        assert (await stream.event())["data"] == "1"
        # Stopping uvicorn from code (not by a signal): end the streams first,
        # or uvicorn waits for them until timeout_graceful_shutdown.
        realtime.end_streams()
        closing_retry(await stream.closing())
        assert await stream.until_end() == b"" and stream.ended
        await stream.close()
    # The lifespan's end closed the streamer.
    assert not streamer.started


async def test_limits_and_an_unstarted_streamer() -> None:
    streamer = Streamer(Config(max_connections=2, max_body_bytes=10))
    realtime = GochanASGI(streamer, publish_key_required=False)
    app = Starlette(routes=[Mount("/rt", app=realtime)])  # nobody starts the streamer
    async with serving(app) as served, httpx.AsyncClient(base_url=served.base) as http:
        r = await http.get("/rt/healthz")
        assert r.status_code == 503 and "lifespan" in r.text
        await streamer.start()
        r = await http.post("/rt/publish?topic=a", content=b"x" * 11)
        assert (r.status_code, r.headers["connection"]) == (413, "close")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read and counted
            for _ in range(3):
                yield b"x" * 5

        r = await http.post("/rt/publish?topic=a", content=chunks())
        assert r.status_code == 413
        streams = [await open_stream(served, "/rt/events") for _ in range(2)]
        r = await http.get("/rt/healthz")
        assert (r.status_code, r.text) == (503, "too many connections\n")
        assert "gochan_connections_refused_total 1.0" in realtime.metrics.render()
        await streams.pop().close()
        await wait_for(lambda: realtime.metrics.connections == 1)
        assert (await http.get("/rt/healthz")).status_code == 200
        await streams[0].config()
        realtime.end_streams()
        closing_retry(await streams[0].closing())
        assert await streams[0].until_end() == b"" and streams[0].ended
        r = await http.get("/rt/events")
        assert (r.status_code, r.text) == (503, "shutting down\n")
        await streams[0].close()
        await streamer.close()


async def test_a_body_cut_short_is_not_published() -> None:
    async with fastapi_example() as served:
        stream = await open_stream(served, "/realtime/events?topic=public.cut", BOB)
        await stream.config()
        _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(
            b"POST /realtime/publish?topic=public.cut HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer alice-token\r\nContent-Length: 100\r\n\r\nonly part"
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.close()
        await writer.wait_closed()
        await stream.no_frame()
        assert served.app.state.streamer.counters["published"] == 0
        await stream.close()


async def test_http2_streams_drop_the_connection_header() -> None:
    """A direct ASGI call, as an HTTP/2 server would make it."""
    streamer = Streamer(Config())
    realtime = GochanASGI(streamer)
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("more_body"):
            gone.set()

    scope = {
        "type": "http",
        "http_version": "2",
        "method": "GET",
        "path": "/events",
        "root_path": "",
        "query_string": b"topic=h2",
        "headers": [(b"host", b"x")],
    }
    async with realtime.lifespan():
        await realtime(scope, receive, send)
        assert streamer.hub.connection_count == 0  # detached on disconnect
    start, first = sent[:2]
    names = [name for name, _ in start["headers"]]
    assert start["status"] == 200 and b"connection" not in names
    assert (b"content-type", b"text/event-stream") in start["headers"]
    assert first["body"].startswith(b"event: message\ndata: {")


# -- same answers as gochan's own server --------------------------------------

PARITY_CLIENT = "parity-client"
KEY = {"authorization": "Bearer k"}
JSON_CT = {"content-type": "application/json"}

PARITY_CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/healthz", {}, b""),
    ("HEAD", "/healthz", {}, b""),
    ("GET", "/readyz", {}, b""),
    ("GET", "/nope", {}, b""),
    ("PUT", "/publish", {}, b""),
    ("DELETE", "/events", {}, b""),
    ("OPTIONS", "/publish", {}, b""),
    ("OPTIONS", "/events", {"origin": "https://app.example"}, b""),
    ("GET", "/healthz", {"origin": "https://app.example"}, b""),
    ("GET", "/healthz", {"origin": "https://evil.example"}, b""),
    ("GET", "/events?id=nobody", {}, b""),
    ("GET", "/events?id=a%20b", {}, b""),
    ("GET", "/events?topic=", {}, b""),
    ("HEAD", "/events", {}, b""),
    ("HEAD", f"/events?id={PARITY_CLIENT}", {}, b""),
    ("GET", "/gochan.js", {}, b""),
    ("POST", "/update_subscriptions", JSON_CT, b"not json"),
    ("POST", "/update_subscriptions", JSON_CT, b"[]"),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":""}'),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":"parity-client","add":"public.x"}'),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":"nobody","add":["public.x"]}'),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":"parity-client","add":["a\\n"]}'),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":"parity-client","add":["b","c"]}'),
    ("POST", "/update_subscriptions", JSON_CT, b'{"client_id":"parity-client","remove":["b"]}'),
    ("POST", "/update_subscriptions", JSON_CT, b"{" + b" " * 2000 + b"}"),
    ("POST", "/publish?topic=a", {}, b"x"),
    ("POST", "/publish?topic=a", {"authorization": "Bearer nope"}, b"x"),
    ("POST", "/publish?topic=a", KEY, b"x"),
    ("POST", "/publish", {**KEY, **JSON_CT}, b'{"topic":"a","data":[1]}'),
    ("POST", "/publish", {**KEY, "content-type": "application/x-www-form-urlencoded"}, b"data=1"),
    ("POST", "/publish", {**KEY, **JSON_CT}, b'{"data":1}'),
    ("POST", "/publish?topic=a%0Ab", KEY, b"x"),
    ("POST", "/publish?topic=message", KEY, b"x"),
]
COMPARED_HEADERS = (
    "content-type",
    "content-length",
    "allow",
    "www-authenticate",
    "cache-control",
    "access-control-allow-origin",
    "access-control-allow-methods",
    "access-control-allow-credentials",
    "vary",
    "server",
)


async def test_every_answer_matches_gochans_own_server() -> None:
    options = {
        "publish_key": "k",
        "max_body_bytes": 1024,
        "cors_origins": ["https://app.example"],
    }
    streamer = Streamer(Config(**options))
    realtime = GochanASGI(streamer)
    app = Starlette(routes=[Mount("/g", app=realtime)], lifespan=realtime.lifespan)
    async with serving(app) as served, running(**options) as raw:
        for s in (streamer, raw.streamer):
            await s.new_custom_client(PARITY_CLIENT, ["a"])
        async with httpx.AsyncClient() as http:
            for method, target, headers, body in PARITY_CASES:
                answers = []
                for base in (f"http://127.0.0.1:{raw.port}", f"{served.base}/g"):
                    r = await http.request(method, base + target, headers=headers, content=body)
                    kept = {h: r.headers.get(h) for h in COMPARED_HEADERS}
                    answers.append((r.status_code, kept, re.sub(rb'"id":"[^"]+"', b"", r.content)))
                assert answers[0] == answers[1], (method, target, body[:60])
        # The streams of one client say the same, byte for byte (but event ids).
        target = f"/events?id={PARITY_CLIENT}"
        origin = {"Origin": "https://app.example"}
        theirs = await SSEStream.open(raw.port, target, origin)
        ours = await open_stream(served, "/g" + target, origin)
        assert ours.headers["access-control-allow-origin"] == theirs.headers.get(
            "access-control-allow-origin"
        )
        for s in (raw.streamer, streamer):
            await s.publish("a", b"one\ntwo")
            await s.publish("c", b"three")
        for _ in range(3):
            assert drop_id(await ours.frame()) == drop_id(await theirs.frame())
        await ours.close()
        await theirs.close()
