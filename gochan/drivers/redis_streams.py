"""The Redis Streams driver (``driver: redis`` with ``streams: true``).

Topic to key mapping
--------------------
The stream key of a topic is ``prefix + topic``, UTF-8 encoded; keys are
binary-safe, so every topic maps. Stream keys live in the keyspace with
other data: use a prefix (``"gochan:"``) so topics cannot collide with it.

Delivery
--------
``publish`` is ``XADD <key> MAXLEN ~ <n> * data <body>`` and returns the
entry id; one reader connection runs ``XREAD BLOCK`` over every held key
from the last entry id seen per topic. ``subscribe`` starts at the stream's
last entry (only new entries). The entry id is the event id. After a
reconnect (the loop every driver shares, ``reconnect_min`` ..
``reconnect_max``) the reader resumes from the last ids: entries added
meanwhile are delivered, none twice. The body is the entry's ``data`` field;
entries without one (added by hand) are skipped with a warning. Publishes
are accepted while the reader reconnects: the entries are kept and read
after it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from ..errors import BrokerConnectionError, BrokerError, ConfigurationError
from ..log import broker_logger
from ._common import require_positive
from ._redis_conn import (
    CONNECTION_ERRORS,
    SESSION_ERRORS,
    RedisBase,
    as_bytes,
    execute,
    options_signature,
)

__all__ = ["STREAM_OPTIONS", "RedisStreamsDriver"]

DEFAULT_STREAM_MAXLEN = 1000
DEFAULT_STREAM_BLOCK_S = 5.0
DEFAULT_STREAM_BATCH = 500
STREAM_OPTIONS = ("stream_maxlen", "stream_block", "stream_batch")

STREAM_DATA_FIELD = b"data"
# Waking a reader blocked in XREAD: CLIENT UNBLOCK answers 0 while the XREAD
# is still on its way to the server; retry a few times.
_UNBLOCK_ATTEMPTS = 20
_UNBLOCK_RETRY_S = 0.005


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _entry_data(fields: Any) -> bytes | None:
    if not isinstance(fields, list):
        return None
    for i in range(0, len(fields) - 1, 2):
        if as_bytes(fields[i]) == STREAM_DATA_FIELD:
            return as_bytes(fields[i + 1])
    return None


class RedisStreamsDriver(RedisBase):
    """Relay Redis Streams to gochan topics.

    Keyword arguments, besides those of :class:`RedisBase`:

    stream_maxlen
        Entries kept per topic, trimmed approximately on each XADD
        (0: never trimmed).
    stream_block
        Seconds one XREAD blocks waiting for entries.
    stream_batch
        Most entries fetched by one XREAD.
    """

    def __init__(
        self,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        stream_block: float = DEFAULT_STREAM_BLOCK_S,
        stream_batch: int = DEFAULT_STREAM_BATCH,
        **options: Any,
    ) -> None:
        require_positive("redis", stream_block=stream_block, stream_batch=stream_batch)
        if stream_maxlen < 0:
            raise ConfigurationError(f"redis stream_maxlen must be >= 0, not {stream_maxlen!r}")
        super().__init__(**options)
        self._stream_maxlen = stream_maxlen
        self._stream_block_s = stream_block
        self._stream_batch = stream_batch
        # Last entry id per topic, and the reader's state.
        self._positions: dict[str, bytes] = {}
        self._wakeup = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False

    async def subscribe(self, topic: str) -> None:
        self._live_conn()
        if topic in self._topics:
            return
        key = self._key(topic)
        client = self._client()
        try:
            last = await asyncio.wait_for(
                execute(client, "XREVRANGE", key, "+", "-", "COUNT", 1),
                self._command_timeout_s,
            )
        except ResponseError as exc:
            raise BrokerError(f"Redis key {key!r} cannot be read as a stream: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"Redis XREVRANGE failed: {exc!r}") from exc
        if topic in self._topics:  # subscribed concurrently
            return
        self._add_topic(topic, key)
        self._positions[topic] = as_bytes(last[0][0]) if last else b"0-0"
        await self._wake_reader()

    async def unsubscribe(self, topic: str) -> None:
        if self._drop_topic(topic) is not None:
            await self._wake_reader()

    async def publish(self, topic: str, data: bytes) -> str | None:
        client = self._client()
        key = self._key(topic)
        trim: list[Any] = ["MAXLEN", "~", self._stream_maxlen] if self._stream_maxlen else []
        try:
            entry_id = await asyncio.wait_for(
                execute(client, "XADD", key, *trim, "*", STREAM_DATA_FIELD, data),
                self._command_timeout_s,
            )
        except ResponseError as exc:
            raise BrokerError(f"Redis refused to publish on {key!r}: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"publish to {self._where()} failed: {exc!r}") from exc
        self._published += 1
        return as_bytes(entry_id).decode()

    def _drop_topic(self, topic: str) -> bytes | None:
        self._positions.pop(topic, None)
        return super()._drop_topic(topic)

    async def _close(self) -> None:
        await super()._close()
        self._positions.clear()

    # -- the reader ----------------------------------------------------------------

    async def _opened(self, conn: AbstractConnection) -> None:
        await conn.send_command("CLIENT", "ID", check_health=False)
        reply = await asyncio.wait_for(conn.read_response(), self._command_timeout_s)
        self._reader_id = int(reply)

    async def _restore(self, conn: AbstractConnection) -> bool:
        self._conn = conn  # the reader resumes from the positions kept
        return bool(conn.is_connected)

    async def _wake_reader(self) -> None:
        """Make the reader pick up a changed set of keys now, not after its block."""
        self._wakeup.set()
        client = self._redis
        for _ in range(_UNBLOCK_ATTEMPTS):
            reader_id = self._reader_id
            if not self._reading or reader_id is None or client is None:
                return
            try:
                if await execute(client, "CLIENT UNBLOCK", reader_id):
                    return
            except CONNECTION_ERRORS as exc:
                broker_logger.debug("Redis CLIENT UNBLOCK failed: %r", exc)
                return
            await asyncio.sleep(_UNBLOCK_RETRY_S)

    async def _serve(self, conn: AbstractConnection) -> str:
        try:
            while True:
                await self._read_once(conn)
        except SESSION_ERRORS as exc:
            return f"lost the connection ({exc})"
        finally:
            self._reading = False

    async def _read_once(self, conn: AbstractConnection) -> None:
        """One XREAD over every held key (or, with none, a PING when quiet)."""
        self._wakeup.clear()
        topics = list(self._positions)
        if not topics:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self._ping_interval_s)
            except asyncio.TimeoutError:
                await conn.send_command("PING", check_health=False)
                await asyncio.wait_for(conn.read_response(), self._command_timeout_s)
            return
        keys = [self._topics[t] for t in topics]
        ids = [self._positions[t] for t in topics]
        block_ms = max(1, round(self._stream_block_s * 1000))
        self._reading = True
        try:
            await conn.send_command(
                "XREAD", "COUNT", self._stream_batch, "BLOCK", block_ms, "STREAMS", *keys, *ids,
                check_health=False,
            )  # fmt: skip
            reply = await asyncio.wait_for(
                conn.read_response(), self._stream_block_s + self._command_timeout_s
            )
        except ResponseError as exc:
            await self._stream_error(topics, exc)
            return
        finally:
            self._reading = False
        for key, entries in reply or ():
            topic = self._by_channel.get(as_bytes(key))
            for entry_id, fields in entries or ():
                if topic is None or topic not in self._positions:
                    break  # unsubscribed meanwhile
                entry_id = as_bytes(entry_id)
                if _entry_key(entry_id) <= _entry_key(self._positions[topic]):
                    continue  # already seen (subscribed again meanwhile)
                self._positions[topic] = entry_id
                data = _entry_data(fields)
                if data is None:
                    broker_logger.warning(
                        "Redis stream entry %s on %r has no %r field; skipped",
                        entry_id.decode(),
                        key,
                        STREAM_DATA_FIELD.decode(),
                    )
                    continue
                self._deliver(topic, data, entry_id.decode())

    async def _stream_error(self, topics: list[str], exc: ResponseError) -> None:
        """XREAD was refused: find the keys that are no streams and drop them."""
        client = self._client()
        bad: list[str] = []
        for topic in topics:
            key = self._topics.get(topic)
            if key is None:
                continue
            kind = as_bytes(await execute(client, "TYPE", key))
            if kind not in (b"stream", b"none"):
                bad.append(topic)
        if not bad:
            raise BrokerError(f"Redis refused XREAD: {exc}")
        for topic in bad:
            self._drop_topic(topic)
            self._report_failure(topic, f"Redis key is no longer a stream: {exc}")


# The config layer types options from the signature: show RedisBase's too.
RedisStreamsDriver.__signature__ = options_signature(  # type: ignore[attr-defined]
    RedisStreamsDriver.__init__, RedisBase.__init__
)
