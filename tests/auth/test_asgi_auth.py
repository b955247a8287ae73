"""The same authorization checks through the ASGI adapter under a real
uvicorn: the JWT authorizer the config asks for, and a hook of the host's
own given to GochanASGI (async, reading the host's session cookie)."""

from __future__ import annotations

import asyncio

import httpx

from gochan import AuthError, AuthRequest, Config, Grant, Streamer
from gochan.asgi import GochanASGI
from tests.auth.tokens import PUBLISH_KEY, SECRET, bearer, token
from tests.test_asgi import ChunkedStream, open_stream, serving


async def refused(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    stream = await ChunkedStream.open(port, target, headers)
    body = await stream.body()
    await stream.close()
    return stream.status, body


async def test_jwt_through_the_adapter_connect_update_publish() -> None:
    streamer = Streamer(Config(jwt_key=SECRET, publish_key=PUBLISH_KEY))
    realtime = GochanASGI(streamer)
    alice = token("alice", subscribe=["a", "room.*"], publish=["room.*"])
    bob = token("bob", subscribe=["*"])
    async with serving(realtime) as served, httpx.AsyncClient(base_url=served.base) as http:
        status, body = await refused(served.port, "/events?topic=a", {})
        assert status == 401 and body.startswith(b"a token is required")
        status, _ = await refused(served.port, "/events?topic=b", bearer(alice))
        assert status == 403
        assert streamer.count_clients() == 0
        stream = await open_stream(served, "/events?topic=a", bearer(alice))
        client_id = (await stream.config())["config"]["client_id"]
        answer = await http.post(
            "/update_subscriptions",
            json={"client_id": client_id, "add": ["b", "room.7"]},
            headers=bearer(alice),
        )
        assert answer.json()["subscriptions"] == ["a", "room.7"]
        assert [e["code"] for e in answer.json()["errors"]] == ["forbidden"]
        # Bob gets the unknown-id answers for Alice's client.
        assert await refused(served.port, f"/events?id={client_id}", bearer(bob)) == (
            401,
            b"Invalid client ID\n",
        )
        body = {"client_id": client_id, "add": ["b"]}
        answer = await http.post("/update_subscriptions", json=body, headers=bearer(bob))
        assert (answer.status_code, answer.text) == (400, "Invalid Client ID\n")
        # Publishing: inside the claims, outside them, and with the publish_key.
        answer = await http.post("/publish?topic=a", content="x", headers=bearer(alice))
        assert answer.status_code == 403
        answer = await http.post("/publish?topic=room.7", content="hi", headers=bearer(alice))
        assert answer.status_code == 200
        answer = await http.post("/publish?topic=a", content="key", headers=bearer(PUBLISH_KEY))
        assert answer.status_code == 200
        assert [(await stream.event())["data"] for _ in range(2)] == ["hi", "key"]
        assert realtime.metrics.refusals["forbidden"] == 3  # connect, update, publish
        realtime.end_streams()
        await stream.close()


class SessionHook:
    """A host's own authorization: its session cookie names the user, and its
    table says what the user may do (async, as a database lookup would be)."""

    def __init__(self) -> None:
        self.sessions = {"s-alice": "alice"}
        self.rights = {"alice": (["alice.*"], ["alice.*"])}
        self.seen: list[AuthRequest] = []

    async def __call__(self, request: AuthRequest) -> Grant:
        self.seen.append(request)
        await asyncio.sleep(0)
        user = self.sessions.get(request.cookies.get("session", ""))
        if user is None:
            raise AuthError(401, "log in first")
        subscribe, publish = self.rights[user]
        return Grant(user, subscribe, publish)


async def test_a_hook_of_the_hosts_own_given_to_the_adapter() -> None:
    hook = SessionHook()
    streamer = Streamer(Config())
    realtime = GochanASGI(streamer, authorize=hook)
    async with serving(realtime) as served, httpx.AsyncClient(base_url=served.base) as http:
        answer = await refused(served.port, "/events?topic=alice.inbox", {})
        assert answer == (401, b"log in first\n")
        cookie = {"Cookie": "session=s-alice"}
        status, _ = await refused(served.port, "/events?topic=bob.inbox", cookie)
        assert status == 403
        stream = await open_stream(served, "/events?topic=alice.inbox", cookie)
        first = await stream.config()
        assert first["subscriptions"] == ["alice.inbox"]
        seen = hook.seen[-1]
        assert (seen.method, seen.path, seen.query["topic"]) == ("GET", "/events", ["alice.inbox"])
        assert seen.peer == "127.0.0.1" and seen.headers["cookie"] == "session=s-alice"
        answer = await http.post("/publish?topic=alice.inbox", content="mine", headers=cookie)
        assert answer.status_code == 200
        assert (await stream.event())["data"] == "mine"
        realtime.end_streams()
        await stream.close()


async def test_a_token_expiring_mid_stream_ends_the_adapters_stream() -> None:
    streamer = Streamer(Config(jwt_key=SECRET))
    realtime = GochanASGI(streamer)
    async with serving(realtime) as served:
        stream = await open_stream(
            served, "/events?topic=a", bearer(token(subscribe=["a"], exp_in=2))
        )
        await stream.config()
        expired = await stream.event(timeout=6)
        assert '"token-expired"' in expired["data"]
        assert await stream.frame() == b"event: message\ndata: Client closed\n\n"
        assert await stream.until_end() == b"" and stream.ended  # the response ends
        await stream.close()
        assert streamer.hub.connection_count == 0
