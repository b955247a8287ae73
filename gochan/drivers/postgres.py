"""The PostgreSQL driver (LISTEN/NOTIFY, through asyncpg).

``NOTIFY`` reaches every session that ``LISTEN``\\s on the channel, so fan-out
between gochan processes is what PostgreSQL does already. Each process holds
one listening connection and, per gochan topic it holds, one ``LISTEN`` on the
channel ``prefix + topic``; ``unsubscribe`` runs ``UNLISTEN``.

``publish(topic, data)`` runs ``SELECT pg_notify(channel, payload)`` on a small
connection pool (so publishing never waits behind the listener). Anything that
can run SQL publishes the same way, and its payload reaches browsers
unchanged::

    SELECT pg_notify('gochan_orders', '{"id": 42}');
    NOTIFY "gochan_orders", '{"id": 42}';    -- quoted: channel names fold to
                                              -- lower case when unquoted

Channel mapping: the channel is ``prefix + topic`` (default prefix
``"gochan_"``), exact and case-sensitive (the driver quotes it as an
identifier, ``"..."`` with ``"`` doubled). PostgreSQL identifiers hold at most
63 bytes and would be silently truncated beyond, so a topic whose channel
would be longer is refused with :class:`~gochan.errors.InvalidTopicError`
(56 bytes of topic with the default prefix). Long names are not hashed: other
publishers must be able to name the channel.

Payloads: ``NOTIFY`` carries text in the database encoding, shorter than 8000
bytes. ``publish`` therefore takes UTF-8 text without NUL bytes, under
:data:`MAX_PAYLOAD_BYTES`; a binary body raises :class:`PayloadError` and an
oversized one :class:`~gochan.errors.LimitExceededError`, both before any I/O
(both are ``ValueError``\\s). Binary data is not encoded behind the
publisher's back: whoever needs it sends base64 or JSON, and browsers get
exactly that text. Received payloads are relayed as their UTF-8 bytes.

Connection loss (server restart, ``pg_terminate_backend``, network cut, found
by asyncpg or by a ``SELECT 1`` every ``ping_interval`` seconds): ``ready``
turns False, the driver reconnects with exponential backoff and jitter, runs
``LISTEN`` again for every topic it held and counts one reconnect. A topic the
server refuses on the new connection is dropped and reported through
``Receiver.on_subscription_failure``. Notifications sent while the listener is
disconnected are lost for this process, so ``publish`` raises
:class:`~gochan.errors.BrokerConnectionError` meanwhile (and when the listener
was lost while the ``NOTIFY`` ran) instead of succeeding.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import asyncpg  # type: ignore[import-untyped]

from ..errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    InterfaceError,
    InvalidTopicError,
    LimitExceededError,
)
from ..log import broker_logger
from ..topicset import TopicSet
from ..waiting import within
from ._common import check_topic_bytes, require_positive
from ._lifecycle import Lifecycle

__all__ = ["PayloadError", "PostgresDriver"]

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_PREFIX = "gochan_"
DEFAULT_APPLICATION_NAME = "gochan"
DEFAULT_POOL_SIZE = 4
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_PING_INTERVAL_S = 15.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 10.0

MAX_CHANNEL_BYTES = 63  # NAMEDATALEN - 1
MAX_PAYLOAD_BYTES = 7999  # NOTIFY refuses payloads of 8000 bytes and more

_T = TypeVar("_T")


class PayloadError(InterfaceError, ValueError):
    """The message body cannot travel as a NOTIFY payload (not UTF-8 text, or NUL)."""


def quote_channel(channel: str) -> str:
    """``channel`` as a quoted SQL identifier, for ``LISTEN``/``NOTIFY``."""
    return '"' + channel.replace('"', '""') + '"'


class PostgresDriver(Lifecycle[Any]):
    """Fan-out over PostgreSQL LISTEN/NOTIFY (see the module docstring).

    Keyword arguments (all optional; the config layer maps ``dsn`` to
    ``--postgres-dsn`` and ``GOCHAN_POSTGRES_DSN``, and so on):

    ``dsn``
        libpq connection URI or keyword string, as asyncpg takes it (the
        usual ``PG*`` environment variables fill what it leaves out).
        Default ``postgresql://postgres@127.0.0.1:5432/postgres``.
    ``prefix``
        Prepended to every topic to form the channel name. Default
        ``"gochan_"``; may be empty. At most 62 bytes.
    ``application_name``
        Shown in ``pg_stat_activity`` for the driver's connections.
        Default ``"gochan"``.
    ``pool_size``
        Connections used for publishing, besides the listening one. Default 4.
    ``timeout``
        Seconds to wait for any server operation (connecting, LISTEN,
        publishing) before failing with :class:`~gochan.errors.BrokerError`.
        Default 5.
    ``ping_interval``
        Seconds between liveness checks of the listening connection, which
        otherwise only notices a dead server when the socket closes.
        Default 15.
    ``reconnect_min``, ``reconnect_max``
        Bounds, in seconds, of the exponential backoff between reconnection
        attempts. Defaults 0.1 and 10.
    """

    name: ClassVar[str] = "postgres"
    broker: ClassVar[str] = "PostgreSQL"

    def __init__(
        self,
        dsn: str = DEFAULT_DSN,
        prefix: str = DEFAULT_PREFIX,
        application_name: str = DEFAULT_APPLICATION_NAME,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT_S,
        ping_interval: float = DEFAULT_PING_INTERVAL_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        try:
            prefix_bytes = len(prefix.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigurationError(f"invalid PostgreSQL channel prefix {prefix!r}") from None
        if prefix_bytes >= MAX_CHANNEL_BYTES or "\0" in prefix:
            raise ConfigurationError(
                f"invalid PostgreSQL channel prefix {prefix!r}: at most "
                f"{MAX_CHANNEL_BYTES - 1} bytes, no NUL"
            )
        if pool_size < 1:
            raise ConfigurationError("PostgreSQL pool_size must be at least 1")
        require_positive("postgres", timeout=timeout, ping_interval=ping_interval)
        self._dsn = dsn
        self._prefix = prefix
        self._prefix_bytes = prefix_bytes
        self._application_name = application_name
        self._pool_size = int(pool_size)
        self._timeout = float(timeout)
        self._ping_interval = float(ping_interval)
        super().__init__(reconnect_min, reconnect_max)
        self._topics: TopicSet = TopicSet()
        self._conn: Any = None  # the listening asyncpg.Connection
        self._pool: Any = None  # asyncpg.Pool for publishing
        self._lost = asyncio.Event()
        # asyncpg runs one operation at a time per connection: LISTEN,
        # UNLISTEN and pings of the listening connection take turns.
        self._lock = asyncio.Lock()

    # -- Driver protocol -------------------------------------------------

    @property
    def backend_pid(self) -> int | None:
        """The server process id of the listening connection (None when down)."""
        conn = self._conn
        if conn is None or conn.is_closed():
            return None
        return int(conn.get_server_pid())

    def channel(self, topic: str) -> str:
        """The channel name for ``topic`` (unquoted); checks the topic first."""
        self.check_topic(topic)
        return self._prefix + topic

    def check_topic(self, topic: str) -> None:
        raw = check_topic_bytes(topic)
        if self._prefix_bytes + len(raw) > MAX_CHANNEL_BYTES:
            raise InvalidTopicError(
                topic,
                f"longer than {MAX_CHANNEL_BYTES - self._prefix_bytes} bytes "
                f"(a PostgreSQL channel name holds {MAX_CHANNEL_BYTES} bytes, "
                f"prefix {self._prefix!r} included)",
            )

    def check_payload(self, data: bytes) -> str:
        """``data`` as NOTIFY payload text; raises before any I/O if it cannot be."""
        if len(data) > MAX_PAYLOAD_BYTES:
            raise LimitExceededError(
                f"message of {len(data)} bytes is too large for PostgreSQL NOTIFY "
                f"(at most {MAX_PAYLOAD_BYTES} bytes)"
            )
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(
                f"the postgres driver carries UTF-8 text only (NOTIFY payloads are "
                f"text); encode binary data first, e.g. as base64: {exc}"
            ) from None
        if "\0" in text:
            raise PayloadError("NOTIFY payloads cannot contain NUL bytes")
        return text

    async def _start(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=1,
            max_size=self._pool_size,
            timeout=self._timeout,
            server_settings={"application_name": self._application_name},
        )

    async def _stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await within(pool.close(), self._timeout)
            except Exception as exc:
                broker_logger.debug("postgres: error closing the pool: %r", exc)
                pool.terminate()

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        conn = self._usable_conn()
        if topic in self._topics:
            return
        self._topics.add(topic)  # first: a notification racing the LISTEN is kept
        try:
            await self._bounded(self._locked(conn.add_listener(self._prefix + topic, self._notify)))
        except BaseException as exc:
            self._topics.discard(topic)
            if isinstance(exc, Exception):
                raise BrokerError(f"cannot LISTEN for {topic!r} on PostgreSQL: {exc!r}") from exc
            raise

    async def unsubscribe(self, topic: str) -> None:
        if topic not in self._topics:
            return
        self._topics.discard(topic)  # nothing more is delivered for it from now on
        conn = self._conn
        if conn is None or not self.ready or conn.is_closed():
            return  # a new session will not LISTEN to it
        try:
            await self._bounded(
                self._locked(conn.remove_listener(self._prefix + topic, self._notify))
            )
        except Exception as exc:
            raise BrokerError(f"cannot UNLISTEN {topic!r} on PostgreSQL: {exc!r}") from exc

    async def publish(self, topic: str, data: bytes) -> str | None:
        self.check_topic(topic)
        payload = self.check_payload(data)
        self._check_open()
        pool = self._pool
        if pool is None:
            raise BrokerConnectionError("not connected to PostgreSQL")
        # Not while this node's listener is not LISTENing (reconnecting): the
        # notification would not reach it, yet the publish would succeed.
        listener = self._usable_conn()
        try:
            await pool.execute(
                "SELECT pg_notify($1, $2)", self._prefix + topic, payload, timeout=self._timeout
            )
        except (OSError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError) as exc:
            raise BrokerConnectionError(
                f"PostgreSQL connection failed while publishing on {topic!r}: {exc!r}"
            ) from exc
        except Exception as exc:
            raise BrokerError(f"cannot publish on {topic!r} to PostgreSQL: {exc!r}") from exc
        if listener is not self._conn or not self.ready or listener.is_closed():
            # The server went away meanwhile (a restart: the pool reconnected,
            # the listener is gone): this node may not have had it.
            raise BrokerConnectionError(
                f"PostgreSQL listening connection lost while publishing on {topic!r}"
            )
        self._published += 1
        return None

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close_conn(conn)
        self._topics.clear()

    # -- internals ---------------------------------------------------------

    def _usable_conn(self) -> Any:
        self._check_ready()
        conn = self._conn
        if conn is None or conn.is_closed():
            raise BrokerConnectionError("not connected to PostgreSQL (reconnecting)")
        return conn

    async def _bounded(self, aw: Awaitable[_T]) -> _T:
        return await within(aw, self._timeout)

    async def _locked(self, aw: Awaitable[_T]) -> _T:
        async with self._lock:
            return await aw

    async def _open(self) -> Any:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            server_settings={"application_name": self._application_name},
        )
        self._lost = lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        broker_logger.debug("postgres: listening connection open (pid %s)", conn.get_server_pid())
        return conn

    async def _close_conn(self, conn: Any) -> None:
        if conn.is_closed():
            return
        try:
            await conn.close(timeout=self._timeout)
        except Exception as exc:
            broker_logger.debug("postgres: error closing the connection: %r", exc)
            conn.terminate()

    def _notify(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        if not channel.startswith(self._prefix):
            self._stray += 1
            return
        self._deliver(channel[len(self._prefix) :], payload.encode("utf-8"))

    async def _serve(self, conn: Any) -> str:
        """Return once the listening connection is found dead."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._lost.wait(), self._ping_interval)
                return "listening connection lost"
            if conn.is_closed():
                return "listening connection closed"
            try:
                await self._bounded(self._locked(conn.fetchval("SELECT 1")))
            except Exception as exc:
                return f"ping failed: {exc!r}"

    async def _restore(self, conn: Any) -> bool:
        """Make ``conn`` the listening connection and LISTEN again to every
        held topic; raises if the connection fails."""
        self._conn = conn
        for topic in list(self._topics):
            if topic not in self._topics:
                continue  # unsubscribed meanwhile
            channel = self._prefix + topic
            try:
                await self._bounded(self._locked(conn.add_listener(channel, self._notify)))
            except asyncpg.PostgresError as exc:
                if conn.is_closed():
                    raise
                self._topics.discard(topic)
                self._report_failure(topic, f"cannot LISTEN again on PostgreSQL: {exc}")
                continue
            if topic not in self._topics:  # unsubscribed while we restored it
                await self._bounded(self._locked(conn.remove_listener(channel, self._notify)))
        return True

    async def _discard(self, conn: Any) -> None:
        """Drop a lost listening connection, or one that failed while being restored."""
        if conn is self._conn:
            self._conn = None
        conn.terminate()
