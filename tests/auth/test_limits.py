"""The limits on one client and one identity, each reached over real HTTP:
max_streams_per_client, max_streams_per_identity, publish_rate_per_identity
(with publish_burst). Each refusal is counted in /metrics and leaves nothing
behind."""

from __future__ import annotations

from tests.auth.test_jwt_server import (
    authorized,
    open_ok,
    publish,
    refusals,
    refused_stream,
)
from tests.auth.tokens import PUBLISH_KEY, bearer, token
from tests.support import SSEStream, running, wait_for


async def test_max_streams_per_client_with_authorization_off() -> None:
    async with running(max_streams_per_client=2) as server:
        first = await SSEStream.open(server.port, "/events?topic=a")
        client_id = (await first.config())["config"]["client_id"]
        second = await SSEStream.open(server.port, f"/events?id={client_id}")
        assert second.status == 200
        status, body = await refused_stream(server.port, f"/events?id={client_id}&topic=b", {})
        assert status == 429
        assert b"max_streams_per_client=2" in body
        assert server.streamer.client_topics(client_id) == ["a"]  # b was not added
        assert len(server.streamer.get_client(client_id).streams) == 2  # type: ignore[union-attr]
        assert server.metrics.refusals["streams_per_client"] == 1
        await first.close()
        third = await SSEStream.open(server.port, f"/events?id={client_id}")
        assert third.status == 200  # a freed place is usable again
        for stream in (second, third):
            await stream.close()


async def test_max_streams_per_identity_counts_every_client_of_the_identity() -> None:
    async with authorized(max_streams_per_identity=2) as (server, http):
        alice = token("alice", subscribe=["*"])
        streams = [(await open_ok(server.port, "/events?topic=a", bearer(alice)))[0]]
        streams.append((await open_ok(server.port, "/events?topic=b", bearer(alice)))[0])
        clients = server.streamer.count_clients()
        status, body = await refused_stream(server.port, "/events?topic=c", bearer(alice))
        assert status == 429
        assert b"max_streams_per_identity=2" in body
        assert server.streamer.count_clients() == clients  # no client made for it
        assert "c" not in server.streamer.subscriptions.subscribed  # no topic opened
        # Another identity has its own share.
        bob = token("bob", subscribe=["*"])
        streams.append((await open_ok(server.port, "/events?topic=a", bearer(bob)))[0])
        assert refusals((await http.get("/metrics")).text, "streams_per_identity") == 1
        await streams[0].close()
        await streams[0].reader.read()
        await wait_for(lambda: server.streamer.identity_streams("alice") == 1)
        streams.append((await open_ok(server.port, "/events?topic=c", bearer(alice)))[0])
        for stream in streams[1:]:
            await stream.close()


async def test_publish_rate_per_identity_answers_429_with_retry_after() -> None:
    options = {"publish_rate_per_identity": 0.5, "publish_burst": 3}
    async with authorized(**options) as (server, http):
        alice = token("alice", publish=["*"])
        for n in range(3):
            assert (await publish(http, alice, "a", f"m{n}")).status_code == 200
        answer = await publish(http, alice, "a", "one too many")
        assert answer.status_code == 429
        assert int(answer.headers["retry-after"]) >= 1
        assert "publish_rate_per_identity" in answer.text
        # Another identity, and the server-side publisher with the key, are not held back.
        bob = token("bob", publish=["*"])
        assert (await publish(http, bob, "a", "bob's")).status_code == 200
        for n in range(5):
            assert (await publish(http, PUBLISH_KEY, "a", f"k{n}")).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert refusals(metrics, "publish_rate") == 1
        assert server.streamer.counters["published"] == 3 + 1 + 5  # the refused one was not


async def test_streams_that_end_before_their_token_leave_nothing_behind() -> None:
    # 400 connections in a burst from one address: not this test's limit.
    async with authorized(connection_rate_per_peer=0) as (server, _http):
        streamer = server.streamer
        tok = token("ivan", subscribe=["a"], exp_in=3600)
        kept, _ = await open_ok(server.port, "/events?topic=a", bearer(tok))
        for _ in range(400):
            stream, _ = await open_ok(server.port, "/events?topic=a", bearer(tok))
            await stream.close()
        await wait_for(lambda: streamer.identity_streams("ivan") == 1)
        # Ended streams' expiry entries are dropped, not kept for an hour.
        assert len(streamer._token_expiry) <= 2 * 1 + 256
        assert len(streamer._token_streams) == 1
        await kept.close()
        await wait_for(lambda: streamer.identity_streams("ivan") == 0)
