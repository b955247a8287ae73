"""Cluster behaviour with nodes in this process (two Streamers on one store):
owner identity across nodes, the cluster-wide TTL, a holder that does not
answer, and a store that goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import nats.js.errors
import pytest

from gochan import Config, Streamer
from gochan.cluster import ClusterNode, key_of
from gochan.server import Server

from ..auth.tokens import SECRET, bearer, token
from ..drivers._nats_server import NatsServer
from ..drivers._redis_server import RedisServer
from ..support import SSEStream, wait_for
from .nodes import cluster_name


def node_config(server: NatsServer, name: str, node_id: str, **options: Any) -> Config:
    return Config(
        port=0,
        driver="nats",
        driver_options={"url": server.url, "prefix": f"{name}.", "jetstream": True,
                        "stream": name.upper()},
        cluster=True,
        cluster_name=name,
        node_id=node_id,
        publish_key="k",
        **options,
    )  # fmt: skip


@contextlib.asynccontextmanager
async def nodes(
    *configs: Config, cluster: ClusterNode | None = None
) -> AsyncIterator[list[Server]]:
    """Started nodes that hear each other; ``cluster``: the last one's."""
    streamers = [
        Streamer(c, cluster=cluster if i == len(configs) - 1 else None)
        for i, c in enumerate(configs)
    ]
    servers = []
    try:
        for streamer in streamers:
            servers.append(await streamer.serve())
        ids = [c.node_id for c in configs]
        for streamer in streamers:
            assert streamer.cluster is not None
            node = streamer.cluster
            await wait_for(lambda node=node: all(i in node.live_nodes() for i in ids), 5.0)
        yield servers
    finally:
        for streamer in streamers:
            await streamer.close()


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def record_exists(server: NatsServer, name: str, client_id: str) -> bool:
    own = await nats.connect(server.url)
    try:
        kv = await own.jetstream().key_value(f"{name}_clients")
        try:
            await kv.get(key_of(client_id))
        except nats.js.errors.KeyNotFoundError:
            return False
        return True
    finally:
        await own.close()


async def test_a_client_answers_to_its_owner_on_every_node(nats_server: NatsServer) -> None:
    name = cluster_name()
    configs = [node_config(nats_server, name, n, jwt_key=SECRET) for n in ("a", "b")]
    async with nodes(*configs) as (a, b), httpx.AsyncClient() as http:
        alice = bearer(token("alice", subscribe=["*"]))
        mallory = bearer(token("mallory", subscribe=["*"]))
        stream = await SSEStream.open(a.port, "/events?topic=x", alice)
        client_id = (await stream.config())["config"]["client_id"]
        # Another identity gets an unknown id on the other node too.
        other = await SSEStream.open(b.port, f"/events?id={client_id}", mallory)
        assert other.status == 401
        await other.close()
        answer = await http.post(
            url(b, "/update_subscriptions"), json={"client_id": client_id, "add": ["y"]},
            headers=mallory,
        )  # fmt: skip
        assert answer.status_code == 400, answer.text
        # Its owner gets it there, with its topics.
        mine = await SSEStream.open(b.port, f"/events?id={client_id}", alice)
        assert mine.status == 200
        assert (await mine.config())["subscriptions"] == ["x"]
        for s in (stream, mine):
            await s.close()


async def test_the_ttl_runs_cluster_wide(nats_server: NatsServer) -> None:
    name = cluster_name()
    configs = [node_config(nats_server, name, n, client_ttl=1.0) for n in ("a", "b")]
    async with nodes(*configs) as (a, b):
        on_a = await SSEStream.open(a.port, "/events?topic=x")
        client_id = (await on_a.config())["config"]["client_id"]
        on_b = await SSEStream.open(b.port, f"/events?id={client_id}")
        await on_b.config()
        await on_a.close()
        # Node b still holds a stream: a's TTL passing does not remove it.
        await asyncio.sleep(2.0)
        assert await record_exists(nats_server, name, client_id)
        again = await SSEStream.open(a.port, f"/events?id={client_id}")
        assert again.status == 200
        await again.close()
        await on_b.close()
        # Nobody holds it now: gone once client_ttl has passed.
        await asyncio.sleep(2.0)
        assert not await record_exists(nats_server, name, client_id)
        gone = await SSEStream.open(b.port, f"/events?id={client_id}")
        assert gone.status == 401
        await gone.close()


class DeafNode(ClusterNode):
    """A node that hears updates but never applies them (a unit of one class
    made to misbehave: the real store, the real other node)."""

    async def _apply_here(self, message: dict[str, Any]) -> None:
        await asyncio.sleep(3600)


async def test_an_update_a_holder_does_not_acknowledge_is_an_error(
    nats_server: NatsServer,
) -> None:
    name = cluster_name()
    a_config = node_config(nats_server, name, "a", cluster_timeout=0.5)
    deaf_config = node_config(nats_server, name, "deaf")
    async with nodes(a_config, deaf_config, cluster=DeafNode(deaf_config)) as (a, deaf):
        stream = await SSEStream.open(deaf.port, "/events?topic=x")
        client_id = (await stream.config())["config"]["client_id"]
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                url(a, "/update_subscriptions"), json={"client_id": client_id, "add": ["y"]}
            )
            assert answer.status_code == 504, answer.text
            assert "deaf" in answer.text and "cluster_timeout" in answer.text
            metrics = (await http.get(url(a, "/metrics"))).text
            assert "gochan_cluster_ack_timeouts_total 1.0" in metrics
        await stream.close()


async def test_a_node_that_loses_its_store_is_not_ready(
    nats_server: NatsServer, redis_server: RedisServer
) -> None:
    # NATS carries the messages, a Redis of its own keeps the clients: with
    # that Redis stopped only the cluster store is missing.
    name = cluster_name()
    config = node_config(nats_server, name, "a", cluster_store=redis_server.url)
    async with nodes(config) as (a,), httpx.AsyncClient() as http:
        answer = await http.get(url(a, "/readyz"))
        assert answer.status_code == 200, answer.text
        assert "node a;" in answer.text and f"cluster store {redis_server.url} up" in answer.text
        metrics = (await http.get(url(a, "/metrics"))).text
        assert 'gochan_cluster_node_info{node_id="a"' in metrics
        redis_server.stop()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 8.0
            while (answer := await http.get(url(a, "/readyz"))).status_code == 200:
                assert loop.time() < deadline, "still ready without its store"
                await asyncio.sleep(0.1)
            assert answer.status_code == 503
            assert "cluster store not ready" in answer.text, answer.text
            refused = await SSEStream.open(a.port, "/events?topic=x")
            assert refused.status == 503
            await refused.close()
        finally:
            redis_server.start()
        deadline = asyncio.get_running_loop().time() + 8.0
        while (answer := await http.get(url(a, "/readyz"))).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, answer.text
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("store", ["nats", "redis"])
async def test_a_dead_nodes_clients_expire_in_the_store(
    store: str, nats_server: NatsServer, redis_server: RedisServer
) -> None:
    name = cluster_name()
    cluster_store = redis_server.url if store == "redis" else ""
    config = node_config(nats_server, name, "a", client_ttl=1.0, cluster_store=cluster_store)
    streamer = Streamer(config)
    server = await streamer.serve()
    stream = await SSEStream.open(server.port, "/events?topic=x")
    client_id = (await stream.config())["config"]["client_id"]
    await stream.close()
    assert streamer.cluster is not None
    node = streamer.cluster
    # The node dies without letting go: no release, no timer, no close.
    for task in node._tasks:
        task.cancel()
    node._tasks = []
    node.holding.clear()
    streamer.cluster = None
    await streamer.close()
    await node.store.close()
    assert node.record_ttl == 3.0  # client_ttl and two refresh periods
    probe = ClusterNode(config.__class__(**{**config.__dict__, "node_id": "probe"}))
    await probe.store.connect("probe", lambda _: None, probe.record_ttl)
    try:
        assert await probe.store.get(key_of(client_id)) is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8.0
        while await probe.store.get(key_of(client_id)) is not None:
            assert loop.time() < deadline, "the record outlived its expiry"
            await asyncio.sleep(0.2)
    finally:
        await probe.store.close()
