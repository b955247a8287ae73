"""What the two Redis drivers share (:class:`RedisBase`): the options, a
pooled client for commands, and the supervised dedicated connection (the
pub/sub subscriber, or the Streams reader) that the shared lifecycle
reconnects.

Topic to key mapping: the channel of a topic is ``prefix + topic``, UTF-8
encoded (the Streams driver keeps every topic in one key, ``prefix +
stream_name``). Redis channels and keys are binary-safe, so every
gochan topic maps and ``check_topic`` refuses nothing.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..errors import BrokerConnectionError, BrokerError, ConfigurationError
from ..log import broker_logger
from ..waiting import within
from ._common import redact_url, reject_renamed, require_positive
from ._lifecycle import Lifecycle

__all__ = ["RedisBase"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = ""
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_COMMAND_TIMEOUT_S = 5.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 5.0
DEFAULT_PING_INTERVAL_S = 10.0
DEFAULT_CLIENT_NAME = "gochan"

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
SESSION_ERRORS: tuple[type[BaseException], ...] = (BrokerError, *CONNECTION_ERRORS)


# redis-py leaves these unannotated; keep the type: ignore in one place.
async def execute(client: redis.asyncio.Redis, *args: Any) -> Any:
    return await client.execute_command(*args)  # type: ignore[no-untyped-call]


async def execute_multi(
    client: redis.asyncio.Redis, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """``commands`` in one MULTI/EXEC, sent as one pipeline; their replies in
    order. Redis runs all of them or, when it refuses one, none; a
    connection lost once EXEC is sent leaves it unknown which."""
    async with client.pipeline(transaction=True) as pipe:
        for command in commands:
            pipe.execute_command(*command)  # queued: the pipeline sends them at execute
        replies: list[Any] = await pipe.execute()
    return replies


def _new_connection(pool: ConnectionPool) -> AbstractConnection:
    conn: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    return conn


async def _connect(conn: AbstractConnection) -> None:
    await conn.connect()  # type: ignore[no-untyped-call]


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def options_signature(*functions: Callable[..., Any]) -> inspect.Signature:
    """The keyword options of ``functions`` together, the first's first: the
    signature the config layer reads for a driver that takes its shared
    options as ``**options`` and hands them to :class:`RedisBase`."""
    params: dict[str, inspect.Parameter] = {}
    for function in functions:
        for name, param in inspect.signature(function).parameters.items():
            if name != "self" and param.kind is not param.VAR_KEYWORD:
                params.setdefault(name, param.replace(kind=param.KEYWORD_ONLY))
    return inspect.Signature(list(params.values()))


class RedisBase(Lifecycle[AbstractConnection]):
    """Options, clients and the supervised connection of a Redis driver.

    Keyword arguments shared by both (the config layer exposes each one as
    ``--redis-<name>`` and ``GOCHAN_REDIS_<NAME>``):

    url
        ``redis://[[user]:password@]host:port/db``, ``rediss://`` for TLS or
        ``unix:///path/to/socket``.
    prefix
        Prepended to every topic to make its channel (pub/sub), or to
        ``stream_name`` to make the one stream key (Streams).
    connect_timeout
        Seconds allowed to open a connection (TCP, TLS, AUTH, SELECT).
    command_timeout
        Seconds allowed for a command's reply (PUBLISH, XADD, a SUBSCRIBE
        confirmation).
    reconnect_min
        Seconds before the first reconnection attempt; doubled each time.
    reconnect_max
        Longest wait between two reconnection attempts, in seconds.
    ping_interval
        Seconds of silence on the dedicated connection before a PING; no
        answer within as long again means the connection is dead.
    name
        Connection name (``CLIENT SETNAME``), shown by ``CLIENT LIST``.
    """

    name: ClassVar[str] = "redis"
    broker: ClassVar[str] = "Redis"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        prefix: str = DEFAULT_PREFIX,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
        ping_interval: float = DEFAULT_PING_INTERVAL_S,
        name: str = DEFAULT_CLIENT_NAME,
        **renamed: Any,
    ) -> None:
        reject_renamed("redis", renamed)
        try:
            url_options = parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"invalid redis url {redact_url(url)!r}: {exc}") from exc
        if str(url_options.get("protocol", 2)) != "2":
            # The dedicated connection parses RESP2 replies itself.
            raise ConfigurationError(
                "the redis driver speaks RESP2: remove protocol=3 from the url"
            )
        require_positive(
            "redis",
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            ping_interval=ping_interval,
        )
        super().__init__(reconnect_min, reconnect_max)
        self._url = url
        self._safe_url = redact_url(url)
        self._prefix = prefix
        self._connect_timeout_s = connect_timeout
        self._command_timeout_s = command_timeout
        self._ping_interval_s = ping_interval
        self._client_name = name

        self._redis: redis.asyncio.Redis | None = None  # commands: PUBLISH, XADD, ...
        self._listen_pool: ConnectionPool | None = None  # makes dedicated connections
        self._conn: AbstractConnection | None = None  # the live dedicated connection
        # topic -> channel (Streams: the topic field) for every held topic, and back.
        self._topics: dict[str, bytes] = {}
        self._by_channel: dict[bytes, str] = {}

    def _where(self) -> str:
        return f"Redis at {self._safe_url}"

    def check_topic(self, topic: str) -> None:
        return None  # channels and keys are binary-safe: every topic maps

    def _key(self, topic: str) -> bytes:
        return (self._prefix + topic).encode()

    def _add_topic(self, topic: str, channel: bytes) -> None:
        self._topics[topic] = channel
        self._by_channel[channel] = topic

    def _drop_topic(self, topic: str) -> bytes | None:
        channel = self._topics.pop(topic, None)
        if channel is not None and self._by_channel.get(channel) == topic:
            del self._by_channel[channel]
        return channel

    def _client(self) -> redis.asyncio.Redis:
        """The command client; ClosedError or BrokerConnectionError when
        the driver is closed or was never connected."""
        self._check_open()
        client = self._redis
        if client is None:
            raise BrokerConnectionError("redis driver is not connected")
        return client

    def _live_conn(self) -> AbstractConnection:
        self._check_ready()
        conn = self._conn
        if conn is None or not conn.is_connected:
            raise BrokerConnectionError(f"not connected to {self._where()} (reconnecting)")
        return conn

    # -- the lifecycle hooks ---------------------------------------------------

    async def _start(self) -> None:
        options: dict[str, Any] = {
            "socket_connect_timeout": self._connect_timeout_s,
            "client_name": self._client_name,
            "protocol": 2,
        }
        # One retry lets a pooled connection broken by a server restart be
        # replaced at once (a command lost with its connection may then run
        # twice); the dedicated connection has the driver's own loop.
        self._redis = redis.asyncio.Redis.from_url(
            self._url,
            socket_timeout=self._command_timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[RedisConnectionError],
            **options,
        )
        # Dedicated reads block for as long as Redis is quiet: no socket
        # timeout there, the driver bounds each wait itself.
        self._listen_pool = ConnectionPool.from_url(
            self._url, socket_timeout=None, retry=Retry(NoBackoff(), 0), **options
        )

    async def _stop(self) -> None:
        client, self._redis = self._redis, None
        pool, self._listen_pool = self._listen_pool, None
        for close in (client.aclose if client else None, pool.aclose if pool else None):
            if close is None:
                continue
            try:
                await close()
            except Exception as exc:
                broker_logger.debug("closing Redis clients failed: %r", exc)

    async def _open(self) -> AbstractConnection:
        """A new dedicated connection, or BrokerConnectionError."""
        assert self._listen_pool is not None
        conn: AbstractConnection | None = None
        try:
            conn = _new_connection(self._listen_pool)
            await within(_connect(conn), self._connect_timeout_s + self._command_timeout_s)
            await self._opened(conn)
        except BaseException as exc:
            if conn is not None:
                await self._discard(conn)
            if isinstance(exc, Exception):
                raise BrokerConnectionError(f"cannot connect to {self._where()}: {exc!r}") from exc
            raise
        return conn

    async def _opened(self, conn: AbstractConnection) -> None:
        """Set up a new dedicated connection (before :meth:`_restore`)."""

    async def _discard(self, conn: AbstractConnection) -> None:
        if conn is self._conn:
            self._conn = None
        try:
            await conn.disconnect()
        except Exception as exc:  # a broken connection may fail to close: it is gone anyway
            broker_logger.debug("closing a Redis connection failed: %r", exc)

    async def _close(self) -> None:
        conn = self._conn
        if conn is not None:
            await self._discard(conn)
        self._topics.clear()
        self._by_channel.clear()
