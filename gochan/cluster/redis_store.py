"""The cluster store on Redis: records as hashes (``rev``, ``data``) with a
key expiry, node inboxes as pub/sub channels.

Compare-and-set runs as Lua scripts, one round trip each, atomic on the
server. Every write and every touch restarts the key's expiry, as a
JetStream bucket's max_age does, so both stores keep records the same way.
Redis replication is asynchronous: a failover to a replica can lose the last
writes, and with them an update a client was told had been applied.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..drivers._common import redact_url
from ..errors import BrokerConnectionError, BrokerError
from ..log import broker_logger
from .store import ALL_NODES, Entry, OnMessage

__all__ = ["RedisStore"]

SOCKET_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5

# KEYS[1] the record; ARGV: value, expiry in ms.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 1, 'data', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
# ARGV: value, expected revision, expiry in ms.
_UPDATE = """
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[2] then return 0 end
local new = tonumber(rev) + 1
redis.call('HSET', KEYS[1], 'rev', new, 'data', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return new
"""
# ARGV: expected revision.
_DELETE = """
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


class RedisStore:
    """A :class:`~gochan.cluster.store.ClusterStore` on one Redis server."""

    def __init__(self, url: str, cluster_name: str) -> None:
        self._redis_url = url
        self._url = redact_url(url)
        self._prefix = f"{cluster_name}:cluster:"
        self._channel = f"{cluster_name}:cluster:"
        self._redis: redis.asyncio.Redis | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ttl_ms = 0
        self._ready = False
        self._scripts: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return self._url

    @property
    def ready(self) -> bool:
        return self._ready and self._redis is not None

    async def connect(self, node_id: str, on_message: OnMessage, record_ttl: float) -> None:
        self._ttl_ms = max(1, round(record_ttl * 1000))
        client = redis.asyncio.Redis.from_url(
            self._redis_url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        self._redis = client
        for name, source in (("create", _CREATE), ("update", _UPDATE), ("delete", _DELETE)):
            self._scripts[name] = client.register_script(source)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        channels = (f"{self._channel}node:{node_id}", f"{self._channel}all")
        try:
            await client.ping()
            await pubsub.subscribe(*channels)
        except RedisError as exc:
            await self.close()
            raise BrokerConnectionError(f"cluster store {self._url}: {exc}") from exc
        self._ready = True
        self._reader = asyncio.get_running_loop().create_task(
            self._read(pubsub, channels, on_message), name="gochan-cluster-inbox"
        )

    async def _read(self, pubsub: Any, channels: tuple[str, ...], on_message: OnMessage) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(timeout=1.0)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    if self._ready:
                        broker_logger.warning("cluster store %s: %s", self._url, exc)
                    self._ready = False
                    await asyncio.sleep(RECONNECT_WAIT_S)
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.reset()
                        await pubsub.subscribe(*channels)
                        self._ready = True
                    continue
                if message is not None and message.get("type") == "message":
                    on_message(message["data"])
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def close(self) -> None:
        self._ready = False
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        client, self._redis = self._redis, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _call(self, operation: Any) -> Any:
        if self._redis is None:
            raise BrokerConnectionError(f"cluster store {self._url}: not connected")
        try:
            result = await operation
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._ready = False
            raise BrokerConnectionError(f"cluster store {self._url}: {exc}") from exc
        except RedisError as exc:
            raise BrokerError(f"cluster store {self._url}: {exc}") from exc
        self._ready = True
        return result

    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise BrokerConnectionError(f"cluster store {self._url}: not connected")
        return self._redis

    async def get(self, key: str) -> Entry | None:
        rev, data = await self._call(self._client().hmget(self._prefix + key, "rev", "data"))
        if rev is None or data is None:
            return None
        return Entry(bytes(data), int(rev))

    async def create(self, key: str, value: bytes) -> int | None:
        done = await self._call(
            self._scripts["create"](keys=[self._prefix + key], args=[value, self._ttl_ms])
        )
        return 1 if done else None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        new = await self._call(
            self._scripts["update"](
                keys=[self._prefix + key], args=[value, str(revision), self._ttl_ms]
            )
        )
        return int(new) or None

    async def delete(self, key: str, revision: int) -> bool:
        done = await self._call(
            self._scripts["delete"](keys=[self._prefix + key], args=[str(revision)])
        )
        return bool(done)

    async def touch(self, keys: list[str]) -> None:
        if not keys:
            return
        pipe = self._client().pipeline(transaction=False)
        for key in keys:
            pipe.pexpire(self._prefix + key, self._ttl_ms)
        await self._call(pipe.execute())

    async def send(self, node_id: str, payload: bytes) -> None:
        where = "all" if node_id == ALL_NODES else f"node:{node_id}"
        await self._call(self._client().publish(f"{self._channel}{where}", payload))
