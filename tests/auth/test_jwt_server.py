"""Authorization end to end: gochan's own server on a real port, real JWTs
over real HTTP (httpx for requests, a raw socket reader for streams)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gochan import JWTAuthorizer
from gochan.server import Server
from tests.auth.tokens import (
    OTHER_SECRET,
    PUBLISH_KEY,
    SECRET,
    bearer,
    ec_key,
    rsa_key,
    token,
    write_jwks,
    write_public_pem,
)
from tests.support import SSEStream, running


@contextlib.asynccontextmanager
async def authorized(**options: Any) -> AsyncIterator[tuple[Server, httpx.AsyncClient]]:
    """A server with authorization on (HS256 and SECRET unless told) and a
    client for its requests."""
    settings = {"jwt_key": SECRET, "publish_key": PUBLISH_KEY, **options}
    async with running(**settings) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            yield server, http


async def refused_stream(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    stream = await SSEStream.open(port, target, headers)
    body = await stream.body()
    await stream.close()
    assert stream.status != 200, body
    return stream.status, body


async def open_ok(port: int, target: str, headers: dict[str, str]) -> tuple[SSEStream, Any]:
    stream = await SSEStream.open(port, target, headers)
    assert stream.status == 200, (stream.head, await stream.body())
    return stream, await stream.config()


async def update(
    http: httpx.AsyncClient, tok: str, client_id: str, add: list[str], remove: list[str] = ()
) -> httpx.Response:
    body = {"client_id": client_id, "add": add, "remove": list(remove)}
    return await http.post("/update_subscriptions", json=body, headers=bearer(tok))


async def publish(http: httpx.AsyncClient, auth: str, topic: str, data: str) -> httpx.Response:
    return await http.post(f"/publish?topic={topic}", content=data, headers=bearer(auth))


def refusals(text: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'gochan_refusals_total{{reason="{reason}"}} '):
            return float(line.split()[1])
    return 0.0


# -- who may connect ---------------------------------------------------------


async def test_without_a_token_every_guarded_path_is_401_with_a_bearer_challenge() -> None:
    async with authorized() as (server, http):
        stream = await SSEStream.open(server.port, "/events?topic=a")
        assert stream.status == 401
        assert stream.headers["www-authenticate"].startswith("Bearer")
        assert stream.headers["content-type"].startswith("text/plain")
        assert b"token" in await stream.body()
        await stream.close()
        answer = await http.post("/update_subscriptions", json={"client_id": "x", "add": ["a"]})
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")
        answer = await http.post("/publish?topic=a", content="hi")
        assert answer.status_code == 401
        assert server.streamer.count_clients() == 0  # nothing made for them
        metrics = (await http.get("/metrics")).text
        assert refusals(metrics, "unauthorized") == 3


@pytest.mark.parametrize(
    ("why", "make", "options"),
    [
        ("bad signature", lambda: token(subscribe=["a"], key=OTHER_SECRET), {}),
        ("expired", lambda: token(subscribe=["a"], exp_in=-30), {}),
        (
            "wrong audience",
            lambda: token(subscribe=["a"], aud="someone-else"),
            {"jwt_audience": "gochan"},
        ),
        ("no audience", lambda: token(subscribe=["a"]), {"jwt_audience": "gochan"}),
        ("wrong issuer", lambda: token(subscribe=["a"], iss="evil"), {"jwt_issuer": "auth"}),
        ("no sub", lambda: token(sub="", subscribe=["a"]), {}),
        ("alg none", lambda: token(subscribe=["a"], key=None, algorithm="none"), {}),
        ("garbage", lambda: "not.a.jwt", {}),
    ],
)
async def test_invalid_tokens_are_401(why: str, make: Any, options: dict[str, Any]) -> None:
    async with authorized(**options) as (server, http):
        tok = make()
        status, body = await refused_stream(server.port, "/events?topic=a", bearer(tok))
        assert status == 401, why
        assert body.startswith(b"invalid token"), body
        assert tok.encode() not in body
        answer = await publish(http, tok, "a", "x")
        assert answer.status_code == 401
        assert server.streamer.count_clients() == 0


async def test_the_right_audience_and_issuer_are_accepted() -> None:
    async with authorized(jwt_audience="gochan", jwt_issuer="auth") as (server, _http):
        tok = token(subscribe=["a"], aud="gochan", iss="auth")
        stream, first = await open_ok(server.port, "/events?topic=a", bearer(tok))
        assert first["subscriptions"] == ["a"]
        await stream.close()


# -- what they may subscribe to -----------------------------------------------


async def test_a_token_for_a_cannot_subscribe_to_b_at_connect() -> None:
    async with authorized() as (server, _http):
        tok = token(subscribe=["a"])
        status, body = await refused_stream(server.port, "/events?topic=a&topic=b", bearer(tok))
        assert status == 403
        assert b"'b'" in body
        assert server.streamer.count_clients() == 0  # a refusal leaves nothing behind
        assert not server.streamer.subscriptions.subscribed


async def test_a_token_for_a_cannot_subscribe_to_b_by_update_and_the_rest_applies() -> None:
    async with authorized() as (server, http):
        tok = token(subscribe=["a", "room.*"], publish=["*"])
        stream, first = await open_ok(server.port, "/events?topic=a", bearer(tok))
        answer = await update(http, tok, first["config"]["client_id"], ["b", "room.1", "a"])
        assert answer.status_code == 200
        body = answer.json()
        assert body["subscriptions"] == ["a", "room.1"]
        assert body["errors"] == [
            {"topic": "b", "code": "forbidden", "message": "not allowed to subscribe to this topic"}
        ]
        assert (await publish(http, tok, "b", "secret")).status_code == 200
        assert (await publish(http, tok, "room.1", "hello")).status_code == 200
        event = await stream.event()
        assert (event["event"], event["data"]) == ("room.1", "hello")  # never b
        await stream.close()


async def test_replay_only_sends_topics_the_new_token_allows() -> None:
    async with authorized() as (server, http):
        both = token("alice", subscribe=["a", "b"])
        stream, first = await open_ok(server.port, "/events?topic=a&topic=b", bearer(both))
        client_id = first["config"]["client_id"]
        assert (await publish(http, PUBLISH_KEY, "a", "a1")).status_code == 200
        seen = await stream.event()
        await stream.close()
        await publish(http, PUBLISH_KEY, "b", "b2")
        await publish(http, PUBLISH_KEY, "a", "a2")
        await publish(http, PUBLISH_KEY, "b", "b3")
        only_a = token("alice", subscribe=["a"])
        headers = {**bearer(only_a), "Last-Event-ID": seen["id"]}
        again, first = await open_ok(server.port, f"/events?id={client_id}", headers)
        assert first["subscriptions"] == ["a"]
        told = orjson.loads((await again.event())["data"])
        assert told == {"replay": {"last_event_id": seen["id"], "recovered": True}}
        replayed = await again.event()
        assert (replayed["event"], replayed["data"]) == ("a", "a2")
        await publish(http, PUBLISH_KEY, "b", "b4")
        await publish(http, PUBLISH_KEY, "a", "a3")
        live = await again.event()
        assert (live["event"], live["data"]) == ("a", "a3")  # nothing of b before it
        assert server.streamer.client_topics(client_id) == ["a"]
        await again.close()


# -- who may publish -----------------------------------------------------------


async def test_publish_inside_the_claims_is_allowed_outside_it_is_403() -> None:
    async with authorized() as (server, http):
        listener = token("bob", subscribe=["news.*"])
        stream, _first = await open_ok(server.port, "/events?topic=news.1", bearer(listener))
        writer = token("alice", publish=["news.*"])
        answer = await publish(http, writer, "news.1", "allowed")
        assert answer.status_code == 200 and answer.json()["id"]
        answer = await publish(http, writer, "sports", "refused")
        assert answer.status_code == 403
        assert (await publish(http, listener, "news.1", "no")).status_code == 403
        # The publish_key is still a server-side publisher's credential.
        assert (await publish(http, PUBLISH_KEY, "news.1", "from the backend")).status_code == 200
        assert (await stream.event())["data"] == "allowed"
        assert (await stream.event())["data"] == "from the backend"
        await stream.close()


# -- whose client id it is ----------------------------------------------------


async def test_another_identitys_client_id_gets_the_unknown_id_answer() -> None:
    async with authorized() as (server, http):
        alice = token("alice", subscribe=["*"])
        bob = token("bob", subscribe=["*"])
        stream, first = await open_ok(server.port, "/events?topic=a", bearer(alice))
        alices = first["config"]["client_id"]
        unknown = "no-such-client-id-000000"
        for_bob = await refused_stream(server.port, f"/events?id={alices}", bearer(bob))
        for_none = await refused_stream(server.port, f"/events?id={unknown}", bearer(bob))
        assert for_bob == for_none == (401, b"Invalid client ID\n")
        answer_bob = await update(http, bob, alices, ["b"])
        answer_unknown = await update(http, bob, unknown, ["b"])
        assert answer_bob.status_code == answer_unknown.status_code == 400
        assert answer_bob.content == answer_unknown.content == b"Invalid Client ID\n"
        assert answer_bob.headers == answer_unknown.headers or (
            {k: v for k, v in answer_bob.headers.items() if k != "date"}
            == {k: v for k, v in answer_unknown.headers.items() if k != "date"}
        )
        assert server.streamer.client_topics(alices) == ["a"]  # untouched
        # Alice herself still may.
        assert (await update(http, alice, alices, ["b"])).json()["subscriptions"] == ["a", "b"]
        await stream.close()


# -- where the token is read ----------------------------------------------------


async def test_cookie_for_the_stream_and_bearer_for_updates() -> None:
    async with authorized() as (server, http):
        tok = token("carol", subscribe=["a", "b"], publish=["a"])
        cookie = {"Cookie": f"theme=dark; gochan_token={tok}; other=1"}
        stream, first = await open_ok(server.port, "/events?topic=a", cookie)
        client_id = first["config"]["client_id"]
        answer = await update(http, tok, client_id, ["b"])
        assert answer.json()["subscriptions"] == ["a", "b"]
        # The cookie serves updates too (a browser's same-site fetch).
        answer = await http.post(
            "/update_subscriptions",
            json={"client_id": client_id, "remove": ["b"]},
            headers={"Cookie": f"gochan_token={tok}"},
        )
        assert answer.json()["subscriptions"] == ["a"]
        await publish(http, tok, "a", "by bearer")
        assert (await stream.event())["data"] == "by bearer"
        await stream.close()


async def test_a_renamed_cookie_and_the_query_parameter_only_when_enabled() -> None:
    tok = token("dave", subscribe=["a"])
    async with authorized(jwt_cookie="session_jwt") as (server, _http):
        status, _ = await refused_stream(server.port, "/events", {"Cookie": f"gochan_token={tok}"})
        assert status == 401
        stream, _ = await open_ok(server.port, "/events", {"Cookie": f"session_jwt={tok}"})
        await stream.close()
        status, _ = await refused_stream(server.port, f"/events?access_token={tok}", {})
        assert status == 401  # off by default: tokens in URLs end up in logs
    async with authorized(jwt_query_param=True) as (server, _http):
        stream, first = await open_ok(server.port, f"/events?access_token={tok}&topic=a", {})
        assert first["subscriptions"] == ["a"]
        await stream.close()


# -- a token that expires while its stream is open -------------------------------


async def test_a_token_expiring_mid_stream_ends_the_stream() -> None:
    async with authorized() as (server, http):
        tok = token("erin", subscribe=["a"], exp_in=2)
        lasting = token("erin", subscribe=["a"], exp_in=300)
        stream, first = await open_ok(server.port, "/events?topic=a", bearer(tok))
        other, _ = await open_ok(server.port, "/events?topic=a", bearer(lasting))
        await publish(http, PUBLISH_KEY, "a", "before")
        assert (await stream.event())["data"] == "before"
        started = time.time()
        expired = await stream.event(timeout=6)
        assert orjson.loads(expired["data"])["error"]["code"] == "token-expired"
        assert (await stream.event())["data"] == "Client closed"
        assert await stream.reader.read() == b""  # then the connection closes
        await stream.close()
        assert time.time() >= started  # it came after the publish, not at once
        # The other stream of the same identity, with a longer token, goes on.
        assert (await other.event())["data"] == "before"
        await publish(http, PUBLISH_KEY, "a", "after")
        assert (await other.event())["data"] == "after"
        assert server.streamer.get_client(first["config"]["client_id"]) is not None
        await other.close()


# -- keys: PEM files and a JWKS ----------------------------------------------------


@pytest.mark.parametrize(("algorithm", "make_key"), [("RS256", rsa_key), ("ES256", ec_key)])
async def test_public_key_tokens_with_a_pem_file(
    tmp_path: Path, algorithm: str, make_key: Any
) -> None:
    key = make_key()
    pem = write_public_pem(key, tmp_path / "public.pem")
    async with authorized(jwt_key=pem, jwt_algorithms=[algorithm]) as (server, http):
        tok = token("frank", subscribe=["a"], publish=["a"], key=key, algorithm=algorithm)
        stream, first = await open_ok(server.port, "/events?topic=a", bearer(tok))
        assert first["subscriptions"] == ["a"]
        assert (await publish(http, tok, "a", "signed")).status_code == 200
        assert (await stream.event())["data"] == "signed"
        forged = token("frank", subscribe=["a"], key=make_key(), algorithm=algorithm)
        status, _ = await refused_stream(server.port, "/events?topic=a", bearer(forged))
        assert status == 401
        # An HMAC token "signed" with the public key's bytes is not accepted.
        confused = token("frank", subscribe=["a"], key=SECRET)
        status, _ = await refused_stream(server.port, "/events?topic=a", bearer(confused))
        assert status == 401
        await stream.close()


async def test_a_jwks_file_with_two_keys_picked_by_kid(tmp_path: Path) -> None:
    first_key, second_key = rsa_key(), ec_key()
    jwks = write_jwks(
        {"2024": (first_key, "RS256"), "2025": (second_key, "ES256")}, tmp_path / "jwks.json"
    )
    options = {"jwt_key": "", "jwt_jwks_file": jwks, "jwt_algorithms": ["RS256", "ES256"]}
    async with authorized(**options) as (server, _http):
        for kid, key, algorithm in (("2024", first_key, "RS256"), ("2025", second_key, "ES256")):
            tok = token("gina", subscribe=["a"], key=key, algorithm=algorithm, kid=kid)
            stream, first = await open_ok(server.port, "/events?topic=a", bearer(tok))
            assert first["subscriptions"] == ["a"]
            await stream.close()
        wrong_kid = token("gina", subscribe=["a"], key=first_key, algorithm="RS256", kid="2025")
        unknown_kid = token("gina", subscribe=["a"], key=first_key, algorithm="RS256", kid="2023")
        no_kid = token("gina", subscribe=["a"], key=first_key, algorithm="RS256")
        for tok in (wrong_kid, unknown_kid, no_kid):
            status, _ = await refused_stream(server.port, "/events?topic=a", bearer(tok))
            assert status == 401


async def test_a_rotated_jwks_file_is_read_again(tmp_path: Path) -> None:
    old, new = rsa_key(), rsa_key()
    path = tmp_path / "jwks.json"
    write_jwks({"old": (old, "RS256")}, path)
    options = {"jwt_key": "", "jwt_jwks_file": str(path), "jwt_algorithms": ["RS256"]}
    async with authorized(**options) as (server, _http):
        hook = server.streamer.authorize
        assert isinstance(hook, JWTAuthorizer)
        hook.jwks_recheck_s = 0.0  # look at the file on every token (default: once a second)
        by_old = token("hana", subscribe=["a"], key=old, algorithm="RS256", kid="old")
        by_new = token("hana", subscribe=["a"], key=new, algorithm="RS256", kid="new")
        assert (await refused_stream(server.port, "/events", bearer(by_new)))[0] == 401
        stream, _ = await open_ok(server.port, "/events", bearer(by_old))  # verified, kept
        await stream.close()
        write_jwks({"new": (new, "RS256")}, path)  # the rotation: old out, new in
        stream, _ = await open_ok(server.port, "/events", bearer(by_new))
        await stream.close()
        assert (await refused_stream(server.port, "/events", bearer(by_old)))[0] == 401
        path.write_text("{ broken")  # a bad write keeps the keys read before
        stream, _ = await open_ok(server.port, "/events", bearer(by_new))
        await stream.close()


async def test_with_authorization_on_loopback_needs_a_token_to_publish() -> None:
    async with running(jwt_key=SECRET) as server:
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert server.router.trust_loopback  # keyless loopback would publish without it
            answer = await http.post("/publish?topic=a", content="x")
            assert answer.status_code == 401
            answer = await publish(http, token(publish=["a"]), "a", "x")
            assert answer.status_code == 200


async def test_a_cross_origin_page_can_tell_a_refused_token() -> None:
    async with authorized(cors_origins=["http://app.test"]) as (server, _http):
        origin = {"Origin": "http://app.test"}
        stream = await SSEStream.open(server.port, "/events", origin)
        assert stream.status == 401
        assert stream.headers["access-control-allow-origin"] == "http://app.test"
        assert stream.headers["access-control-expose-headers"] == "WWW-Authenticate"
        await stream.body()
        await stream.close()
