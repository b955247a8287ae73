"""The Redis Streams driver (``driver: redis`` with ``streams: true``): a
:class:`~gochan.drivers.base.DurableDriver`, so ``Last-Event-ID`` resumes on
any gochan node on the same Redis, and after a gochan restart.

One stream key for every topic
------------------------------
Every topic's messages go to ONE stream key, ``prefix + stream_name``
(``gochan-stream`` by default), each entry carrying its topic and body as
the fields ``topic`` and ``data`` -- as JetStream keeps one stream whose
subjects are the topics. The reason is replay: a browser sends back ONE
``Last-Event-ID``, and entry ids are per key (and within one millisecond two
keys' ids do not follow creation order), so with a key per topic a single id
cannot say where every one of the client's topics stopped. One key gives
one global order: an entry id names a point in it, the same on every node
and after a restart, and replay is ``XRANGE`` after that point, filtered by
the client's topics.

What it costs:

- Every node reads every entry of the key (one ``XREAD BLOCK`` connection)
  and drops those for topics it does not hold: its Redis traffic is the
  whole publish rate, not just its topics'.
- ``stream_maxlen`` caps ALL topics together (trimmed approximately on each
  ``XADD``): a busy topic shortens a quiet one's replay window. Size it for
  the replay window you need at the total publish rate.
- The key lives on one Redis Cluster shard: publishing does not spread over
  shards.
- Other programs publish with ``XADD <key> * topic <topic> data <body>``;
  entries without both fields are skipped with a warning.

(Positions per topic -- an id encoding every topic's entry id -- would
keep keys per topic but make ids grow with the client's topics, and could
not be sent as one SSE ``id:`` shared by every connection.)

Event ids and positions
-----------------------
The event id is the entry id (``<ms>-<seq>``); its position is
``ms * 2**64 + seq``, which grows in publish order. Replay after an id
needs that entry still in the stream: an id trimmed away by
``stream_maxlen``, deleted, from another Redis, or from the future is
answered with :class:`~gochan.errors.ReplayGapError` before anything is
yielded, so the browser is told ``recovered: false``. An entry trimmed while
a replay pages through the stream ends the replay the same way midway.

Delivery
--------
``publish`` is ``XADD <key> MAXLEN ~ <n> * topic <topic> data <body>`` and
returns the entry id. The reader starts at the stream's last entry when
the first topic is held (``subscribe``), reads from the last entry id it
saw and dispatches each entry to the topic it names. After a reconnect (the
loop every driver shares, ``reconnect_min`` .. ``reconnect_max``) it
resumes from that id: entries added meanwhile are delivered, none twice.
Publishes are accepted while the reader reconnects: the entries are kept
and read after it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from ..errors import (
    BatchPublishError,
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    ReplayGapError,
)
from ..log import broker_logger
from ..waiting import within
from ._common import require_positive
from ._redis_conn import (
    CONNECTION_ERRORS,
    SESSION_ERRORS,
    RedisBase,
    as_bytes,
    execute,
    execute_multi,
    options_signature,
)

__all__ = ["STREAM_OPTIONS", "RedisStreamsDriver"]

DEFAULT_STREAM_NAME = "gochan-stream"
DEFAULT_STREAM_MAXLEN = 10000
DEFAULT_STREAM_BLOCK_S = 5.0
DEFAULT_STREAM_BATCH = 500
STREAM_OPTIONS = ("stream_name", "stream_maxlen", "stream_block", "stream_batch")

STREAM_TOPIC_FIELD = b"topic"
STREAM_DATA_FIELD = b"data"
_SEQ_BITS = 64  # an entry id's sequence part is a 64-bit number
_SEQ_MAX = (1 << _SEQ_BITS) - 1
_ENTRY_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


def entry_position(entry_id: str) -> int | None:
    """The position an entry id ``<ms>-<seq>`` names, or None."""
    match = _ENTRY_ID.fullmatch(entry_id)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > _SEQ_MAX or seq > _SEQ_MAX:
        return None
    return (ms << _SEQ_BITS) | seq


def position_entry(position: int) -> bytes:
    """The entry id of a position."""
    return b"%d-%d" % (position >> _SEQ_BITS, position & _SEQ_MAX)


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _entry_fields(fields: Any) -> tuple[bytes | None, bytes | None]:
    """The ``topic`` and ``data`` fields of an entry (None when missing)."""
    if isinstance(fields, dict):  # parsed by redis-py's command client
        topic, data = fields.get(STREAM_TOPIC_FIELD), fields.get(STREAM_DATA_FIELD)
        return (
            None if topic is None else as_bytes(topic),
            None if data is None else as_bytes(data),
        )
    topic = data = None
    if isinstance(fields, list):  # raw, as the reader's connection reads it
        for i in range(0, len(fields) - 1, 2):
            name = as_bytes(fields[i])
            if name == STREAM_TOPIC_FIELD:
                topic = as_bytes(fields[i + 1])
            elif name == STREAM_DATA_FIELD:
                data = as_bytes(fields[i + 1])
    return topic, data


class RedisStreamsDriver(RedisBase):
    """Relay one Redis stream to gochan topics, with broker replay.

    Keyword arguments, besides those of :class:`RedisBase`:

    stream_name
        The one stream key of every topic, after ``prefix``.
    stream_maxlen
        Entries kept in the stream, for all topics together, trimmed
        approximately on each XADD (0: never trimmed).
    stream_block
        Seconds one XREAD blocks waiting for entries.
    stream_batch
        Most entries fetched by one XREAD or one replay XRANGE.
    """

    def __init__(
        self,
        stream_name: str = DEFAULT_STREAM_NAME,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        stream_block: float = DEFAULT_STREAM_BLOCK_S,
        stream_batch: int = DEFAULT_STREAM_BATCH,
        **options: Any,
    ) -> None:
        require_positive("redis", stream_block=stream_block, stream_batch=stream_batch)
        if stream_maxlen < 0:
            raise ConfigurationError(f"redis stream_maxlen must be >= 0, not {stream_maxlen!r}")
        if not stream_name:
            raise ConfigurationError("redis stream_name must not be empty")
        super().__init__(**options)
        self._stream = self._key(stream_name)
        self._stream_maxlen = stream_maxlen
        self._stream_block_s = stream_block
        self._stream_batch = stream_batch
        # The last entry id the reader saw; None while no topic is held.
        self._cursor: bytes | None = None
        self._wakeup = asyncio.Event()

    async def subscribe(self, topic: str) -> None:
        self._live_conn()
        if topic in self._topics:
            return
        client = self._client()
        try:
            # Also tells a key of another type at once (WRONGTYPE).
            last = await within(
                execute(client, "XREVRANGE", self._stream, "+", "-", "COUNT", 1),
                self._command_timeout_s,
            )
        except ResponseError as exc:
            raise BrokerError(
                f"Redis key {self._stream!r} cannot be read as a stream: {exc}"
            ) from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"Redis XREVRANGE failed: {exc!r}") from exc
        if topic in self._topics:  # subscribed concurrently
            return
        if self._cursor is None:  # the first topic: read what comes from now on
            self._cursor = as_bytes(last[0][0]) if last else b"0-0"
        # The reader dispatches by the entry's topic field: map it back.
        self._add_topic(topic, topic.encode())
        self._wakeup.set()

    async def unsubscribe(self, topic: str) -> None:
        if self._drop_topic(topic) is not None and not self._topics:
            self._cursor = None  # the next first topic starts from the end again

    async def publish(self, topic: str, data: bytes) -> str | None:
        client = self._client()
        trim: list[Any] = ["MAXLEN", "~", self._stream_maxlen] if self._stream_maxlen else []
        try:
            entry_id = await within(
                execute(
                    client, "XADD", self._stream, *trim, "*",
                    STREAM_TOPIC_FIELD, topic.encode(), STREAM_DATA_FIELD, data,
                ),
                self._command_timeout_s,
            )  # fmt: skip
        except ResponseError as exc:
            raise BrokerError(f"Redis refused to publish on {self._stream!r}: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"publish to {self._where()} failed: {exc!r}") from exc
        self._published += 1
        return as_bytes(entry_id).decode()

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Every XADD in one MULTI/EXEC: the entries are consecutive in the
        stream, and Redis takes all of them or none."""
        client = self._client()
        trim: list[Any] = ["MAXLEN", "~", self._stream_maxlen] if self._stream_maxlen else []
        commands = [
            ("XADD", self._stream, *trim, "*", STREAM_TOPIC_FIELD, topic.encode(),
             STREAM_DATA_FIELD, data)
            for topic, data in messages
        ]  # fmt: skip
        try:
            entry_ids = await within(execute_multi(client, commands), self._command_timeout_s)
        except ResponseError as exc:
            error = BrokerError(f"Redis refused the batch on {self._stream!r}: {exc}")
            raise BatchPublishError([], len(messages), error) from exc
        except CONNECTION_ERRORS as exc:
            error = BrokerConnectionError(f"publish to {self._where()} failed: {exc!r}")
            raise BatchPublishError([], len(messages), error) from exc
        self._published += len(entry_ids)
        return [as_bytes(entry_id).decode() for entry_id in entry_ids]

    async def _close(self) -> None:
        await super()._close()
        self._cursor = None

    # -- replay (DurableDriver) ------------------------------------------------------

    @property
    def durable(self) -> bool:
        """Always: the stream keeps the entries, their ids are positions."""
        return True

    def event_position(self, event_id: str) -> int | None:
        return entry_position(event_id)

    async def replay(
        self, topics: Sequence[str], after: int
    ) -> AsyncGenerator[tuple[str, bytes, str], None]:
        """The entries on ``topics`` after position ``after``, read with
        XRANGE in pages up to the stream's last entry at the call. Each page
        starts at the entry seen last, so an entry trimmed meanwhile is a
        gap, never skipped silently."""
        client = self._client()
        wanted = {topic.encode(): topic for topic in topics}
        cursor = position_entry(after)
        last = await self._command(client, "XREVRANGE", self._stream, "+", "-", "COUNT", 1)
        end = as_bytes(last[0][0]) if last else None
        if end is None or _entry_key(end) < _entry_key(cursor):
            raise ReplayGapError(f"entry {cursor.decode()} is beyond {self._stream!r}'s last")
        while True:
            page = await self._command(
                client, "XRANGE", self._stream, cursor, end, "COUNT", self._stream_batch + 1
            )
            if not page or as_bytes(page[0][0]) != cursor:
                raise ReplayGapError(
                    f"entry {cursor.decode()} is no longer in {self._stream!r} "
                    "(trimmed, deleted, or never there)"
                )
            for entry_id, fields in page[1:]:
                cursor = as_bytes(entry_id)
                topic_field, data = _entry_fields(fields)
                topic = wanted.get(topic_field) if topic_field is not None else None
                if topic is not None and data is not None:
                    yield topic, data, cursor.decode()
            if len(page) <= self._stream_batch or cursor == end:
                return

    async def _command(self, client: redis.asyncio.Redis, *args: Any) -> Any:
        try:
            return await within(execute(client, *args), self._command_timeout_s)
        except ResponseError as exc:
            raise BrokerError(f"Redis refused {args[0]} on {self._stream!r}: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"Redis {args[0]} failed: {exc!r}") from exc

    # -- the reader ----------------------------------------------------------------

    async def _restore(self, conn: AbstractConnection) -> bool:
        self._conn = conn  # the reader resumes from the entry id it saw last
        return bool(conn.is_connected)

    async def _serve(self, conn: AbstractConnection) -> str:
        try:
            while True:
                await self._read_once(conn)
        except SESSION_ERRORS as exc:
            return f"lost the connection ({exc})"

    async def _read_once(self, conn: AbstractConnection) -> None:
        """One XREAD of the stream (or, with no topic held, a PING when quiet)."""
        self._wakeup.clear()
        cursor = self._cursor
        if cursor is None:
            try:
                await within(self._wakeup.wait(), self._ping_interval_s)
            except asyncio.TimeoutError:
                await conn.send_command("PING", check_health=False)
                await within(conn.read_response(), self._command_timeout_s)
            return
        block_ms = max(1, round(self._stream_block_s * 1000))
        try:
            await conn.send_command(
                "XREAD", "COUNT", self._stream_batch, "BLOCK", block_ms,
                "STREAMS", self._stream, cursor,
                check_health=False,
            )  # fmt: skip
            reply = await within(
                conn.read_response(), self._stream_block_s + self._command_timeout_s
            )
        except ResponseError as exc:
            await self._stream_error(exc)
            return
        for _key, entries in reply or ():
            for entry_id, fields in entries or ():
                entry_id = as_bytes(entry_id)
                seen = self._cursor
                if seen is None:
                    return  # no topic held any more
                if _entry_key(entry_id) <= _entry_key(seen):
                    continue  # before the first topic held now was subscribed
                self._cursor = entry_id
                self._dispatch(entry_id, fields)

    def _dispatch(self, entry_id: bytes, fields: Any) -> None:
        topic_field, data = _entry_fields(fields)
        if topic_field is None or data is None:
            broker_logger.warning(
                "Redis stream entry %s in %r has no %r or %r field; skipped",
                entry_id.decode(),
                self._stream,
                STREAM_TOPIC_FIELD.decode(),
                STREAM_DATA_FIELD.decode(),
            )
            return
        topic = self._by_channel.get(topic_field)
        if topic is not None:  # others are for topics other nodes hold
            self._deliver(topic, data, entry_id.decode())

    async def _stream_error(self, exc: ResponseError) -> None:
        """XREAD was refused: if the key is no stream now, every topic is lost."""
        kind = as_bytes(await execute(self._client(), "TYPE", self._stream))
        if kind in (b"stream", b"none"):
            raise BrokerError(f"Redis refused XREAD: {exc}")
        for topic in list(self._topics):
            self._drop_topic(topic)
            self._report_failure(topic, f"Redis key {self._stream!r} is no longer a stream: {exc}")
        self._cursor = None


# The config layer types options from the signature: show RedisBase's too.
RedisStreamsDriver.__signature__ = options_signature(  # type: ignore[attr-defined]
    RedisStreamsDriver.__init__, RedisBase.__init__
)
