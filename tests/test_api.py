"""POST /update_subscriptions, POST /publish and the operations endpoints,
end to end with a real HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson

import gochan
from gochan import Config, MemDriver, Streamer
from gochan.errors import BrokerError
from gochan.server import Server
from tests.support import SSEStream, raw_request, running


@contextlib.asynccontextmanager
async def client_and_stream(server: Server) -> AsyncIterator[tuple[str, SSEStream]]:
    stream = await SSEStream.open(server.port, "/events")
    client_id = (await stream.config())["config"]["client_id"]
    try:
        yield client_id, stream
    finally:
        await stream.close()


async def test_update_add_remove_and_delivery() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        async with client_and_stream(server) as (client_id, stream):
            r = await http.post(
                base + "/update_subscriptions",
                json={"client_id": client_id, "add": ["a", "b", "a"], "remove": []},
            )
            assert r.status_code == 200
            assert r.json() == {"client_id": client_id, "subscriptions": ["a", "b"], "errors": []}
            await http.post(base + "/publish?topic=b", content=b"to b")
            assert (await stream.event())["data"] == "to b"
            r = await http.post(
                base + "/update_subscriptions", json={"client_id": client_id, "remove": ["b"]}
            )
            assert r.json()["subscriptions"] == ["a"]
            # Removed before the response: nothing for b may follow it.
            await http.post(base + "/publish?topic=b", content=b"late")
            await http.post(base + "/publish?topic=a", content=b"to a")
            assert (await stream.event())["data"] == "to a"
            # Adds apply before removes.
            r = await http.post(
                base + "/update_subscriptions",
                json={"client_id": client_id, "add": ["c"], "remove": ["c", "a"]},
            )
            assert r.json()["subscriptions"] == []


async def test_update_errors() -> None:
    async with running(max_body_bytes=1000) as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/update_subscriptions"
        async with client_and_stream(server) as (client_id, _stream):
            cases = [
                (b"{not json", 400, b"malformed JSON"),
                (b"[1,2]", 400, b"JSON object"),
                (b'{"add":["a"]}', 400, b"missing client_id"),
                (b'{"client_id":"nobody","add":["a"]}', 400, b"Invalid Client ID"),
                (orjson.dumps({"client_id": client_id, "add": "a"}), 400, b"list of strings"),
                (orjson.dumps({"client_id": client_id, "add": [1]}), 400, b"list of strings"),
                (orjson.dumps({"client_id": client_id, "add": ["a\nb"]}), 400, b"invalid topic"),
                (orjson.dumps({"client_id": client_id, "add": ["message"]}), 400, b"reserved"),
            ]
            for body, status, text in cases:
                r = await http.post(url, content=body)
                assert r.status_code == status, body
                assert text in r.content, (body, r.content)
            assert server.streamer.client_topics(client_id) == []
            r = await http.post(url, content=b'{"client_id":"%s","add":["%s"]}' % (
                client_id.encode(), b"x" * 2000))  # fmt: skip
            assert r.status_code == 413
            r = await http.get(url)
            assert r.status_code == 405
            assert r.headers["allow"] == "POST, OPTIONS"
            r = await http.put(url, content=b"{}")
            assert r.status_code == 405


class FlakyDriver(MemDriver):
    """Fault injection: the broker refuses topics whose name starts with 'down'."""

    async def subscribe(self, topic: str) -> None:
        if topic.startswith("down"):
            raise BrokerError(f"broker refused {topic}")
        await super().subscribe(topic)


async def test_broker_failures_are_reported_per_topic() -> None:
    streamer = Streamer(Config(port=0), driver=FlakyDriver())
    await streamer.start()
    server = await streamer.serve()
    try:
        async with httpx.AsyncClient() as http, client_and_stream(server) as (client_id, stream):
            r = await http.post(
                f"http://127.0.0.1:{server.port}/update_subscriptions",
                json={"client_id": client_id, "add": ["up", "down1"]},
            )
            assert r.status_code == 200
            body = r.json()
            assert body["subscriptions"] == ["up"]
            assert body["errors"] == [
                {
                    "topic": "down1",
                    "code": "subscription-failure",
                    "message": "broker refused down1",
                }
            ]
            assert await stream.frame() == (
                b'event: message\ndata: {"error":{"code":"subscription-failure",'
                b'"message":"broker refused down1","topic":"down1"}}\n\n'
            )
        # At connect, failures follow the first frame.
        stream = await SSEStream.open(server.port, "/events?topic=down2&topic=ok")
        assert (await stream.config())["subscriptions"] == ["ok"]
        assert b'"topic":"down2"' in await stream.frame()
        await stream.close()
    finally:
        await streamer.close()


async def test_publish_errors_and_auth() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish"
        assert (await http.post(url, content=b"no topic")).status_code == 400
        assert (await http.post(url + "?topic=a%0Ab", content=b"x")).status_code == 400
        assert (await http.post(url, json={"data": 1})).status_code == 400
        assert (await http.get(url)).status_code == 405
    async with running(publish_key="s3cret") as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish?topic=a"
        assert (await http.post(url, content=b"x")).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert (await http.post(url, content=b"x", headers=bad)).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert (await http.post(url, content=b"x", headers=good)).status_code == 200


async def test_keyless_publishing_follows_the_bound_address_not_the_config() -> None:
    # The default Config says 127.0.0.1, but the server is bound to every
    # interface: keyless publishing must be refused, as the CLI refuses it.
    streamer = Streamer(Config(port=0))
    await streamer.start()
    try:
        server = await streamer.serve(host="0.0.0.0")
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{server.port}/publish?topic=a", content=b"x")
            assert r.status_code == 403 and b"publish_key" in r.content
        # The embedding factory cannot see what it is bound to: refused
        # unless the caller promises loopback only.
        loop = asyncio.get_running_loop()
        wide = await loop.create_server(streamer.protocol_factory(), "0.0.0.0", 0)
        local = await loop.create_server(
            streamer.protocol_factory(loopback_only=True), "127.0.0.1", 0
        )
        async with httpx.AsyncClient() as http:
            for listener, status in ((wide, 403), (local, 200)):
                port = listener.sockets[0].getsockname()[1]
                r = await http.post(f"http://127.0.0.1:{port}/publish?topic=a", content=b"x")
                assert r.status_code == status, (port, r.text)
        wide.close()
        local.close()
    finally:
        await streamer.close()


async def test_cors_and_preflight() -> None:
    async with running(cors_origins=["https://app.example"]) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        r = await http.options(
            base + "/update_subscriptions",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        r = await http.get(base + "/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        stream = await SSEStream.open(server.port, "/events", {"Origin": "https://app.example"})
        assert stream.headers["access-control-allow-origin"] == "https://app.example"
        await stream.close()


async def test_health_ready_metrics() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        assert (await http.get(base + "/healthz")).text == "ok\n"
        assert (await http.get(base + "/readyz")).status_code == 200
        stream = await SSEStream.open(server.port, "/events?topic=m")
        await stream.config()
        await http.post(base + "/publish?topic=m", content=b"x")
        await stream.event()
        metrics = (await http.get(base + "/metrics")).text
        values = dict(
            line.split(" ", 1) for line in metrics.splitlines() if not line.startswith("#")
        )
        assert values["gochan_streams"] == "1.0"
        assert values["gochan_deliveries_total"] == "1.0"
        assert values["gochan_messages_published_total"] == "1.0"
        assert values['gochan_driver_ready{driver="mem"}'] == "1.0"
        assert (await http.get(base + "/nope")).status_code == 404
        await stream.close()
        await server.streamer.driver.close()
        assert (await http.get(base + "/readyz")).status_code == 503


async def test_static_dir_and_client_js(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "app.js").write_text("export {}")
    (tmp_path.parent / "secret.txt").write_text("no")
    async with running(static_dir=str(tmp_path)) as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        r = await http.get(base + "/")
        assert r.status_code == 200 and r.text == "<h1>hi</h1>"
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        r = await http.get(base + "/sub/app.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        for bad in ("/../secret.txt", "/%2e%2e/secret.txt", "/sub/../../secret.txt", "/missing"):
            request = f"GET {bad} HTTP/1.1\r\nConnection: close\r\n\r\n".encode()
            answer = await raw_request(server.port, request)
            assert answer.startswith(b"HTTP/1.1 404"), (bad, answer[:40])
        assert (await http.post(base + "/")).status_code == 404
        r = await http.get(base + "/gochan.js")
        shipped = Path(gochan.__file__).parent / "static" / "gochan.js"
        if shipped.exists():
            assert r.status_code == 200 and r.content == shipped.read_bytes()
            assert r.headers["content-type"].startswith("text/javascript")
        else:
            assert r.status_code == 404
    async with running() as server, httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{server.port}/")).status_code == 404


async def test_a_topic_the_broker_lost_can_be_added_again() -> None:
    driver = MemDriver()
    streamer = Streamer(Config(port=0), driver=driver)
    await streamer.start()
    server = await streamer.serve()
    try:
        async with httpx.AsyncClient() as http, client_and_stream(server) as (client_id, stream):
            url = f"http://127.0.0.1:{server.port}/update_subscriptions"
            await http.post(url, json={"client_id": client_id, "add": ["t"]})
            # What a driver does when a topic cannot be restored after a reconnect.
            await driver.unsubscribe("t")
            streamer.on_subscription_failure("t", "not restored")
            assert b'"topic":"t"' in await stream.frame()
            assert await streamer.publish("t", b"lost") is None  # nobody subscribed
            r = await http.post(url, json={"client_id": client_id, "add": ["t"]})
            assert r.json()["errors"] == [] and "t" in driver.topics
            await streamer.publish("t", b"back")
            assert (await stream.event())["data"] == "back"
    finally:
        await streamer.close()


async def test_publish_names_one_topic() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        stream = await SSEStream.open(server.port, "/events?topic=a&topic=b")
        await stream.config()
        base = f"http://127.0.0.1:{server.port}/publish"
        r = await http.post(f"{base}?topic=a&topic=b", content=b"x")
        assert r.status_code == 400 and "one topic" in r.text
        r = await http.post(base, data={"topic": ["a", "b"], "data": "x"})
        assert r.status_code == 400 and "one topic" in r.text
        await stream.no_frame()  # neither topic got it
        await stream.close()


async def test_a_refused_connect_leaves_no_client_behind() -> None:
    async with running(max_topics_per_client=2) as server, httpx.AsyncClient() as http:
        streamer = server.streamer
        base = f"http://127.0.0.1:{server.port}/events"
        await streamer.new_client(["held1", "held2", "held3"][:2])
        # Topics the driver holds already (refused without awaiting) and new
        # ones (refused after the broker step): neither leaves a client.
        for query in ("topic=held1&topic=held2&topic=held1x", "topic=n1&topic=n2&topic=n3"):
            r = await http.get(f"{base}?{query}")
            assert r.status_code == 400 and "at most 2 topics" in r.text
        assert streamer.count_clients() == 1
