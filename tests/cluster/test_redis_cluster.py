"""The same cluster on Redis: records as Redis keys, inboxes as Redis
pub/sub, messages (and their ids) in one Redis stream, so a killed node's
browsers resume elsewhere with nothing lost."""

from __future__ import annotations

import redis.asyncio

from ..drivers._redis_server import RedisServer
from ..support import SSEStream
from .nodes import (
    cluster,
    cluster_name,
    kill_and_resume,
    publish,
    read_until,
    update,
)


def redis_args(server: RedisServer, name: str) -> list[str]:
    return [
        "--driver", "redis",
        "--redis-url", server.url,
        "--redis-prefix", f"{name}:",
        "--redis-streams",
        "--cluster",
        "--cluster-name", name,
    ]  # fmt: skip


async def test_redis_cluster_serves_any_client_and_survives_a_kill(
    redis_server: RedisServer,
) -> None:
    name = cluster_name()
    async with cluster(["a", "b", "c"], redis_args(redis_server, name)) as (nodes, http):
        a, b, c = nodes
        stream = await SSEStream.open(a.port, "/events?topic=given")
        client_id = (await stream.config())["config"]["client_id"]
        # The record is a Redis key, with an expiry.
        store = redis.asyncio.Redis.from_url(redis_server.url)
        key = f"{name}:cluster:c.{client_id}"
        assert await store.ttl(key) > 0
        await store.aclose()

        answer = await update(http, c, client_id, add=["added"])
        assert answer.status_code == 200, answer.text
        await publish(http, b, "added", "now")
        assert (await read_until(stream, 1))[0]["data"] == "now"
        second = await SSEStream.open(b.port, f"/events?id={client_id}")
        assert (await second.config())["subscriptions"] == ["given", "added"]
        await second.close()

        sent: dict[str, list[str]] = {"given": [], "added": ["now"]}
        before = [{"event": "added", "data": "now"}]
        again = await kill_and_resume(http, stream, client_id, a, (b, c), b, sent, before)
        await again.close()
