"""The Redis driver: Redis pub/sub by default, Redis Streams for durable topics.

Topic to channel mapping
------------------------
The channel (or, with streams, the key) of a topic is ``prefix + topic``,
UTF-8 encoded. Redis channels and keys are binary-safe, so every gochan topic
maps and :meth:`RedisDriver.check_topic` refuses nothing; ``redis-cli
publish <prefix><topic> ...`` reaches the topic. Pub/sub channels live apart
from the keyspace, but stream keys do not: with ``streams=True`` use a prefix
(``"gochan:"``) so topics cannot collide with other data.

Delivery
--------
Pub/sub: one dedicated connection in subscriber mode holds ONE ``SUBSCRIBE``
per topic (never a pattern, never a consumer group), so every gochan process
receives every message; the body is relayed byte for byte. Publishing uses a
separate pooled connection (``PUBLISH``).

Streams (``streams=True``): ``publish`` is ``XADD <key> MAXLEN ~ <n> * data
<body>`` and returns the entry id; one reader connection runs ``XREAD BLOCK``
over every held key from the last entry id seen per topic. ``subscribe``
starts at the stream's last entry (only new entries). The entry id is the
event id. After a reconnect the reader resumes from the last ids: entries
added meanwhile are delivered, none twice. The body is the entry's ``data``
field; entries without one (added by hand) are skipped with a warning.

Reconnects
----------
When the subscriber/reader connection drops, the driver reconnects with
exponential backoff and jitter (``reconnect_wait`` .. ``reconnect_wait_max``)
and subscribes every held topic again, one ``SUBSCRIBE`` per topic so that a
refusal (an ACL ``NOPERM``) is attributed to its topic:
``Receiver.on_subscription_failure`` is called for exactly those. ``ready``
is False meanwhile and ``subscribe`` raises
:class:`~gochan.errors.BrokerConnectionError` at once, and so does a pub/sub
``publish``: Redis pub/sub is at-most-once and drops what is published while
this node's subscriptions are being restored, so such a publish is refused
rather than acknowledged and lost. For the same reason a ``PUBLISH`` on a
topic this node holds that Redis delivered to no subscriber is refused (the
server lost our ``SUBSCRIBE`` before the subscriber connection noticed); one
delivered to other nodes' subscribers only is not detected. Streams accept
publishes meanwhile: the entries are kept and read after the reconnect. A
silent connection is detected by a ``PING`` after ``ping_interval`` seconds
of quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from ..errors import BrokerConnectionError, BrokerError, ClosedError, ConfigurationError
from ..log import broker_logger
from ._common import (
    backoff,
    cancel_and_wait,
    redact_url,
    report_failure,
    require_open,
    require_positive,
)
from .base import Receiver

__all__ = ["RedisDriver"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = ""
DEFAULT_STREAM_MAXLEN = 1000
DEFAULT_STREAM_BLOCK_S = 5.0
DEFAULT_STREAM_BATCH = 500
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_COMMAND_TIMEOUT_S = 5.0
DEFAULT_RECONNECT_WAIT_S = 0.1
DEFAULT_RECONNECT_WAIT_MAX_S = 5.0
DEFAULT_PING_INTERVAL_S = 10.0
DEFAULT_CLIENT_NAME = "gochan"

STREAM_DATA_FIELD = b"data"
# Waking a reader blocked in XREAD: CLIENT UNBLOCK answers 0 while the XREAD
# is still on its way to the server; retry a few times.
_UNBLOCK_ATTEMPTS = 20
_UNBLOCK_RETRY_S = 0.005

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
_SESSION_ERRORS: tuple[type[BaseException], ...] = (BrokerError, *_CONNECTION_ERRORS)


# redis-py leaves these unannotated; keep the type: ignore in one place.
async def _execute(client: redis.asyncio.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


def _new_connection(pool: ConnectionPool) -> AbstractConnection:
    conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    return conn


async def _connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


def _entry_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


@dataclass
class _Pending:
    """A reply the subscriber connection owes us, in the order asked."""

    kind: bytes  # b"subscribe", b"unsubscribe" or b"pong"
    topic: str | None = None
    future: asyncio.Future[None] | None = None
    restore: bool = False


class RedisDriver:
    """Relay Redis pub/sub channels (or Redis Streams) to gochan topics.

    Keyword arguments (all optional; the config layer exposes each one as
    ``--redis-<name>`` and ``GOCHAN_REDIS_<NAME>``):

    url
        ``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS or
        ``unix:///path/to/socket``.
    prefix
        Prepended to every topic to make its channel or stream key.
    streams
        Use Redis Streams (XADD/XREAD, entry ids as event ids) instead of
        pub/sub.
    stream_maxlen
        Streams: entries kept per topic, trimmed approximately on each XADD
        (0: never trimmed).
    stream_block
        Streams: seconds one XREAD blocks waiting for entries.
    stream_batch
        Streams: most entries fetched by one XREAD.
    connect_timeout
        Seconds allowed to open a connection (TCP, TLS, AUTH, SELECT).
    command_timeout
        Seconds allowed for a command's reply (PUBLISH, XADD, a SUBSCRIBE
        confirmation).
    reconnect_wait
        Seconds before the first reconnection attempt; doubled each time.
    reconnect_wait_max
        Longest wait between two reconnection attempts, in seconds.
    ping_interval
        Seconds of silence on the subscriber connection before a PING; no
        answer within as long again means the connection is dead.
    name
        Connection name (``CLIENT SETNAME``), shown by ``CLIENT LIST``.
    """

    name: ClassVar[str] = "redis"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        prefix: str = DEFAULT_PREFIX,
        streams: bool = False,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        stream_block: float = DEFAULT_STREAM_BLOCK_S,
        stream_batch: int = DEFAULT_STREAM_BATCH,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
        reconnect_wait: float = DEFAULT_RECONNECT_WAIT_S,
        reconnect_wait_max: float = DEFAULT_RECONNECT_WAIT_MAX_S,
        ping_interval: float = DEFAULT_PING_INTERVAL_S,
        name: str = DEFAULT_CLIENT_NAME,
    ) -> None:
        try:
            url_options = parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid redis url {redact_url(url)!r}: {exc}") from exc
        if str(url_options.get("protocol", 2)) != "2":
            # The subscriber connection parses RESP2 replies itself.
            raise ConfigurationError(
                "the redis driver speaks RESP2: remove protocol=3 from the url"
            )
        require_positive(
            "redis",
            stream_block=stream_block,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            reconnect_wait=reconnect_wait,
            reconnect_wait_max=reconnect_wait_max,
            ping_interval=ping_interval,
            stream_batch=stream_batch,
        )
        if stream_maxlen < 0:
            raise ConfigurationError(f"redis stream_maxlen must be >= 0, not {stream_maxlen!r}")
        self._url = url
        self._safe_url = redact_url(url)
        self._prefix = prefix
        self._streams = streams
        self._stream_maxlen = stream_maxlen
        self._stream_block_s = stream_block
        self._stream_batch = stream_batch
        self._connect_timeout_s = connect_timeout
        self._command_timeout_s = command_timeout
        self._reconnect_wait_s = reconnect_wait
        self._reconnect_wait_max_s = max(reconnect_wait, reconnect_wait_max)
        self._ping_interval_s = ping_interval
        self._client_name = name

        self._receiver: Receiver | None = None
        self._redis: redis.asyncio.Redis | None = None  # commands: PUBLISH, XADD, ...
        self._listen_pool: ConnectionPool | None = None  # makes subscriber connections
        self._conn: AbstractConnection | None = None  # the live subscriber connection
        self._task: asyncio.Task[None] | None = None
        self._ready = False
        self._closed = False
        self._lost = False  # a connection was lost and ready has not come back yet
        self._reconnects = 0
        # topic -> channel (stream key) for every held topic, and back.
        self._topics: dict[str, bytes] = {}
        self._by_channel: dict[bytes, str] = {}
        # pub/sub: replies owed by the subscriber connection, in order.
        self._pending: deque[_Pending] = deque()
        self._send_lock = asyncio.Lock()
        self._restoring = 0
        # streams: last entry id per topic, and the reader's state.
        self._positions: dict[str, bytes] = {}
        self._wakeup = asyncio.Event()
        self._reader_id: int | None = None
        self._reading = False

    # -- Driver protocol ---------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and not self._closed

    def stats(self) -> dict[str, Any]:
        return {"reconnects": self._reconnects, "subscriptions": len(self._topics)}

    def check_topic(self, topic: str) -> None:
        return None  # channels and keys are binary-safe: every topic maps

    async def connect(self, receiver: Receiver) -> None:
        require_open(self._closed)
        if self._task is not None:
            raise BrokerError("redis driver is already connected")
        options: dict[str, Any] = {
            "socket_connect_timeout": self._connect_timeout_s,
            "client_name": self._client_name,
            "protocol": 2,
        }
        # One retry lets a pooled connection broken by a server restart be
        # replaced at once (a command lost with its connection may then run
        # twice); the subscriber connection has its own loop.
        self._redis = redis.asyncio.Redis.from_url(
            self._url,
            socket_timeout=self._command_timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            **options,
        )
        # Subscriber reads block for as long as the channel is quiet: no
        # socket timeout there, the driver bounds each wait itself.
        self._listen_pool = ConnectionPool.from_url(
            self._url, socket_timeout=None, retry=Retry(NoBackoff(), 0), **options
        )
        try:
            conn = await self._open_conn()
        except BaseException:
            await self._close_clients()
            raise
        if self._closed:  # closed while connecting
            await self._drop_conn(conn)
            raise ClosedError("driver is closed")
        self._receiver = receiver
        self._conn = conn
        self._ready = True
        self._task = asyncio.get_running_loop().create_task(
            self._run(conn), name="gochan-redis-listener"
        )
        broker_logger.info("connected to Redis at %s", self._safe_url)

    async def subscribe(self, topic: str) -> None:
        require_open(self._closed)
        conn = self._live_conn()
        if topic in self._topics:
            return
        channel = (self._prefix + topic).encode()
        if self._streams:
            await self._subscribe_stream(topic, channel)
        else:
            await self._subscribe_channel(conn, topic, channel)

    async def unsubscribe(self, topic: str) -> None:
        channel = self._drop_topic(topic)
        if channel is None:
            return
        if self._streams:
            await self._wake_reader()
            return
        conn = self._conn
        if conn is None or not conn.is_connected:
            return  # the subscription went with the connection
        done = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(
                self._request(
                    conn, [("UNSUBSCRIBE", channel)], [_Pending(b"unsubscribe", topic, done)], done
                ),
                self._command_timeout_s,
            )
        except _SESSION_ERRORS as exc:
            broker_logger.debug("Redis UNSUBSCRIBE %r failed: %r", channel, exc)

    async def publish(self, topic: str, data: bytes) -> str | None:
        require_open(self._closed)
        client = self._redis
        if client is None:
            raise BrokerConnectionError("redis driver is not connected")
        key = (self._prefix + topic).encode()
        if not self._streams and not self._ready:
            # Redis drops what is published while this node's subscriber is
            # resubscribing: refused, not acknowledged and lost.
            raise BrokerConnectionError(
                f"not connected to Redis at {self._safe_url} (resubscribing)"
            )
        try:
            if self._streams:
                trim: list[Any] = (
                    ["MAXLEN", "~", self._stream_maxlen] if self._stream_maxlen else []
                )
                entry_id = await asyncio.wait_for(
                    _execute(client, "XADD", key, *trim, "*", STREAM_DATA_FIELD, data),
                    self._command_timeout_s,
                )
                return _as_bytes(entry_id).decode()
            receivers = await asyncio.wait_for(
                _execute(client, "PUBLISH", key, data), self._command_timeout_s
            )
        except ResponseError as exc:
            raise BrokerError(f"Redis refused to publish on {key!r}: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(
                f"publish to Redis at {self._safe_url} failed: {exc!r}"
            ) from exc
        if topic in self._topics and (not self._ready or int(receivers) < 1):
            # PUBLISH answers how many subscribers got it, and this node is
            # one: none means the server has not got our SUBSCRIBE (it was
            # restarted and the subscriber connection has not noticed yet).
            raise BrokerConnectionError(
                f"Redis delivered the message on {key!r} to no subscriber of this node"
                " (subscriber connection lost)"
            )
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready = False
        task, self._task = self._task, None
        await cancel_and_wait(task)
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._drop_conn(conn)
        self._fail_pending("driver closed")
        self._topics.clear()
        self._by_channel.clear()
        self._positions.clear()
        self._receiver = None
        await self._close_clients()

    # -- connections ---------------------------------------------------------

    def _live_conn(self) -> AbstractConnection:
        conn = self._conn
        if conn is None or not self._ready or not conn.is_connected:
            raise BrokerConnectionError(
                f"not connected to Redis at {self._safe_url} (reconnecting)"
            )
        return conn

    async def _open_conn(self) -> AbstractConnection:
        """A new subscriber connection, or BrokerConnectionError."""
        assert self._listen_pool is not None
        conn: AbstractConnection | None = None
        try:
            conn = _new_connection(self._listen_pool)
            await asyncio.wait_for(
                _connect(conn), self._connect_timeout_s + self._command_timeout_s
            )
            if self._streams:
                await conn.send_command("CLIENT", "ID", check_health=False)
                reply = await asyncio.wait_for(conn.read_response(), self._command_timeout_s)
                self._reader_id = int(reply)
        except BaseException as exc:
            if conn is not None:
                await self._drop_conn(conn)
            if isinstance(exc, Exception):
                raise BrokerConnectionError(
                    f"cannot connect to Redis at {self._safe_url}: {exc!r}"
                ) from exc
            raise
        return conn

    async def _drop_conn(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect()
        except Exception as exc:  # a broken connection may fail to close: it is gone anyway
            broker_logger.debug("closing a Redis connection failed: %r", exc)

    async def _close_clients(self) -> None:
        client, self._redis = self._redis, None
        pool, self._listen_pool = self._listen_pool, None
        for close in (client.aclose if client else None, pool.aclose if pool else None):
            if close is None:
                continue
            try:
                await close()
            except Exception as exc:
                broker_logger.debug("closing Redis clients failed: %r", exc)

    async def _run(self, conn: AbstractConnection | None) -> None:
        """The listener: one session per connection, reconnecting in between."""
        attempt = 0
        while not self._closed:
            if conn is None:
                await asyncio.sleep(
                    backoff(attempt, self._reconnect_wait_s, self._reconnect_wait_max_s)
                )
                attempt += 1
                try:
                    conn = await self._open_conn()
                except BrokerError as exc:
                    broker_logger.info("Redis reconnection attempt %d failed: %s", attempt, exc)
                    continue
            try:
                self._conn = conn
                if self._streams:
                    await self._stream_session(conn)
                else:
                    await self._pubsub_session(conn)
            except _SESSION_ERRORS as exc:
                if not self._closed:
                    broker_logger.warning(
                        "lost the connection to Redis at %s (%s); reconnecting (%d topics)",
                        self._safe_url,
                        exc,
                        len(self._topics),
                    )
            except Exception:  # a bug must not leave the driver without a listener
                broker_logger.exception("Redis listener failed; reconnecting")
            finally:
                was_ready = self._ready
                if self._conn is conn:
                    self._conn = None
                self._lost = not self._closed
                self._ready = False
                self._reading = False
                self._fail_pending("connection to Redis lost")
                await self._drop_conn(conn)
            if was_ready:  # a working connection was lost: retry quickly
                attempt = 0
            conn = None

    def _session_ready(self) -> None:
        self._ready = True
        if self._lost:
            self._lost = False
            self._reconnects += 1
            broker_logger.info(
                "reconnected to Redis at %s; %d topics resubscribed",
                self._safe_url,
                len(self._topics),
            )

    # -- pub/sub -------------------------------------------------------------

    async def _pubsub_session(self, conn: AbstractConnection) -> None:
        topics = list(self._topics.items())
        self._restoring = len(topics)
        if topics:
            await self._send(
                conn,
                [("SUBSCRIBE", channel) for _topic, channel in topics],
                [_Pending(b"subscribe", topic, restore=True) for topic, _channel in topics],
            )
        else:
            self._session_ready()
        ping_sent = False
        while True:
            try:
                reply = await conn.read_response(timeout=self._ping_interval_s)
            except ResponseError as exc:
                self._resolve(None, f"{type(exc).__name__}: {exc}")
                continue
            if reply is None:  # quiet for ping_interval
                if ping_sent:
                    raise BrokerConnectionError(
                        f"Redis did not answer a PING within {self._ping_interval_s}s"
                    )
                ping_sent = True
                await self._send(conn, [("PING",)], [_Pending(b"pong")])
                continue
            ping_sent = False
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if kind == b"message" and len(reply) == 3:
                    self._deliver(reply[1], _as_bytes(reply[2]), None)
                    continue
                if kind in (b"subscribe", b"unsubscribe", b"pong"):
                    self._resolve(kind, None)
                    continue
            elif reply == b"PONG":  # PING outside subscriber mode (no channel held)
                self._resolve(b"pong", None)
                continue
            broker_logger.debug("unexpected reply on the Redis subscriber connection: %r", reply)

    async def _subscribe_channel(
        self, conn: AbstractConnection, topic: str, channel: bytes
    ) -> None:
        self._topics[topic] = channel
        self._by_channel[channel] = topic
        done = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(
                self._request(
                    conn, [("SUBSCRIBE", channel)], [_Pending(b"subscribe", topic, done)], done
                ),
                self._command_timeout_s,
            )
        except BaseException as exc:
            if self._topics.get(topic) == channel:
                self._drop_topic(topic)
            if isinstance(exc, asyncio.TimeoutError):
                # The SUBSCRIBE may still be applied: undo it, unconfirmed.
                with contextlib.suppress(BrokerError):
                    await self._send(conn, [("UNSUBSCRIBE", channel)], [_Pending(b"unsubscribe")])
                raise BrokerConnectionError(
                    f"Redis did not confirm SUBSCRIBE {channel!r} within {self._command_timeout_s}s"
                ) from exc
            raise

    async def _request(
        self,
        conn: AbstractConnection,
        commands: Sequence[tuple[Any, ...]],
        pending: list[_Pending],
        done: asyncio.Future[None],
    ) -> None:
        try:
            await self._send(conn, commands, pending)
            await done
        finally:
            if not done.done():  # nobody else will look at it
                done.cancel()

    async def _send(
        self, conn: AbstractConnection, commands: Sequence[tuple[Any, ...]], pending: list[_Pending]
    ) -> None:
        """Write ``commands`` on the subscriber connection, owing ``pending`` replies.

        The lock keeps the order of ``self._pending`` that of the wire.
        """
        async with self._send_lock:
            if conn is not self._conn or not conn.is_connected:
                raise BrokerConnectionError("connection to Redis lost")
            self._pending.extend(pending)
            try:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            except _CONNECTION_ERRORS as exc:
                raise BrokerConnectionError(f"write to Redis failed: {exc!r}") from exc

    def _resolve(self, kind: bytes | None, error: str | None) -> None:
        """The next owed reply came: ``kind`` on success, ``error`` on refusal."""
        if not self._pending:
            raise BrokerError(f"unexpected reply from Redis: {kind!r} {error!r}")
        pending = self._pending.popleft()
        if error is None and kind != pending.kind:
            raise BrokerError(f"out of step with Redis: {kind!r} for a {pending.kind!r}")
        topic = pending.topic
        if pending.restore:
            self._restoring -= 1
            if error is not None and topic is not None and topic in self._topics:
                self._drop_topic(topic)
                self._report_failure(topic, f"Redis refused SUBSCRIBE: {error}")
            if self._restoring == 0:
                self._session_ready()
        future = pending.future
        if future is not None and not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(BrokerError(f"Redis refused {pending.kind!r}: {error}"))

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, deque()
        self._restoring = 0
        for item in pending:
            if item.future is not None and not item.future.done():
                item.future.set_exception(BrokerConnectionError(reason))

    # -- streams -------------------------------------------------------------

    async def _subscribe_stream(self, topic: str, key: bytes) -> None:
        client = self._redis
        assert client is not None
        try:
            last = await asyncio.wait_for(
                _execute(client, "XREVRANGE", key, "+", "-", "COUNT", 1),
                self._command_timeout_s,
            )
        except ResponseError as exc:
            raise BrokerError(f"Redis key {key!r} cannot be read as a stream: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"Redis XREVRANGE failed: {exc!r}") from exc
        if topic in self._topics:  # subscribed concurrently
            return
        self._topics[topic] = key
        self._by_channel[key] = topic
        self._positions[topic] = _as_bytes(last[0][0]) if last else b"0-0"
        await self._wake_reader()

    async def _wake_reader(self) -> None:
        """Make the reader pick up a changed set of keys now, not after its block."""
        self._wakeup.set()
        client = self._redis
        for _ in range(_UNBLOCK_ATTEMPTS):
            reader_id = self._reader_id
            if not self._reading or reader_id is None or client is None:
                return
            try:
                if await _execute(client, "CLIENT UNBLOCK", reader_id):
                    return
            except _CONNECTION_ERRORS as exc:
                broker_logger.debug("Redis CLIENT UNBLOCK failed: %r", exc)
                return
            await asyncio.sleep(_UNBLOCK_RETRY_S)

    async def _stream_session(self, conn: AbstractConnection) -> None:
        self._session_ready()
        block_ms = max(1, round(self._stream_block_s * 1000))
        while True:
            self._wakeup.clear()
            topics = list(self._positions)
            if not topics:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._ping_interval_s)
                except asyncio.TimeoutError:
                    await conn.send_command("PING", check_health=False)
                    await asyncio.wait_for(conn.read_response(), self._command_timeout_s)
                continue
            keys = [self._topics[t] for t in topics]
            ids = [self._positions[t] for t in topics]
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
                continue
            finally:
                self._reading = False
            for key, entries in reply or ():
                topic = self._by_channel.get(_as_bytes(key))
                for entry_id, fields in entries or ():
                    if topic is None or topic not in self._positions:
                        break  # unsubscribed meanwhile
                    entry_id = _as_bytes(entry_id)
                    if _entry_key(entry_id) <= _entry_key(self._positions[topic]):
                        continue  # already seen (subscribed again meanwhile)
                    self._positions[topic] = entry_id
                    data = self._entry_data(fields)
                    if data is None:
                        broker_logger.warning(
                            "Redis stream entry %s on %r has no %r field; skipped",
                            entry_id.decode(),
                            key,
                            STREAM_DATA_FIELD.decode(),
                        )
                        continue
                    self._deliver(_as_bytes(key), data, entry_id.decode())

    @staticmethod
    def _entry_data(fields: Any) -> bytes | None:
        if not isinstance(fields, list):
            return None
        for i in range(0, len(fields) - 1, 2):
            if _as_bytes(fields[i]) == STREAM_DATA_FIELD:
                return _as_bytes(fields[i + 1])
        return None

    async def _stream_error(self, topics: list[str], exc: ResponseError) -> None:
        """XREAD was refused: find the keys that are no streams and drop them."""
        client = self._redis
        assert client is not None
        bad: list[str] = []
        for topic in topics:
            key = self._topics.get(topic)
            if key is None:
                continue
            kind = _as_bytes(await _execute(client, "TYPE", key))
            if kind not in (b"stream", b"none"):
                bad.append(topic)
        if not bad:
            raise BrokerError(f"Redis refused XREAD: {exc}")
        for topic in bad:
            self._drop_topic(topic)
            self._report_failure(topic, f"Redis key is no longer a stream: {exc}")

    # -- delivery ------------------------------------------------------------

    def _deliver(self, channel: Any, data: bytes, event_id: str | None) -> None:
        topic = self._by_channel.get(_as_bytes(channel))
        receiver = self._receiver
        if topic is None or receiver is None:
            return
        try:
            receiver.on_message(topic, data, event_id)
        except Exception:
            broker_logger.exception("receiver failed on a message for topic %r", topic)

    def _drop_topic(self, topic: str) -> bytes | None:
        channel = self._topics.pop(topic, None)
        if channel is not None and self._by_channel.get(channel) == topic:
            del self._by_channel[channel]
        self._positions.pop(topic, None)
        return channel

    def _report_failure(self, topic: str, message: str) -> None:
        report_failure(self.name, self._receiver, topic, message)
