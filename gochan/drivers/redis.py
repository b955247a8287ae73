"""The Redis pub/sub driver, and the ``redis`` registry entry for both Redis
drivers (``streams=True`` builds a
:class:`~gochan.drivers.redis_streams.RedisStreamsDriver`).

Topic to channel mapping
------------------------
The channel of a topic is ``prefix + topic``, UTF-8 encoded. Redis channels
are binary-safe, so every gochan topic maps and ``check_topic`` refuses
nothing; ``redis-cli publish <prefix><topic> ...`` reaches the topic.

Delivery
--------
One dedicated connection in subscriber mode holds ONE ``SUBSCRIBE`` per
topic (never a pattern, never a consumer group), so every gochan process
receives every message; the body is relayed byte for byte. Publishing uses a
separate pooled connection (``PUBLISH``).

Reconnects
----------
When the subscriber connection drops, the driver reconnects with exponential
backoff and jitter (``reconnect_min`` .. ``reconnect_max``, the loop every
driver shares) and subscribes every held topic again, one ``SUBSCRIBE`` per
topic so that a refusal (an ACL ``NOPERM``) is attributed to its topic:
``Receiver.on_subscription_failure`` is called for exactly those. ``ready``
is False meanwhile and ``subscribe`` raises
:class:`~gochan.errors.BrokerConnectionError` at once, and so does
``publish``: Redis pub/sub is at-most-once and drops what is published while
this node's subscriptions are being restored, so such a publish is refused
rather than acknowledged and lost. For the same reason a ``PUBLISH`` on a
topic this node holds that Redis delivered to no subscriber is refused (the
server lost our ``SUBSCRIBE`` before the subscriber connection noticed); one
delivered to other nodes' subscribers only is not detected. A silent
connection is detected by a ``PING`` after ``ping_interval`` seconds of
quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from ..errors import BatchPublishError, BrokerConnectionError, BrokerError, ConfigurationError
from ..log import broker_logger
from ..waiting import within
from ._redis_conn import (
    CONNECTION_ERRORS,
    SESSION_ERRORS,
    RedisBase,
    as_bytes,
    execute,
    execute_multi,
    options_signature,
)
from .base import Driver
from .redis_streams import STREAM_OPTIONS, RedisStreamsDriver

__all__ = ["RedisDriver", "RedisPubSubDriver"]


@dataclass
class _Pending:
    """A reply the subscriber connection owes us, in the order asked."""

    kind: bytes  # b"subscribe", b"unsubscribe" or b"pong"
    topic: str | None = None
    future: asyncio.Future[None] | None = None
    restore: bool = False


class RedisPubSubDriver(RedisBase):
    """Relay Redis pub/sub channels to gochan topics (options: :class:`RedisBase`)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # Replies owed by the subscriber connection, in order.
        self._pending: deque[_Pending] = deque()
        self._send_lock = asyncio.Lock()
        self._restoring = 0

    async def subscribe(self, topic: str) -> None:
        conn = self._live_conn()
        if topic in self._topics:
            return
        channel = self._key(topic)
        self._add_topic(topic, channel)
        done = asyncio.get_running_loop().create_future()
        try:
            await within(
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

    async def unsubscribe(self, topic: str) -> None:
        channel = self._drop_topic(topic)
        conn = self._conn
        if channel is None or conn is None or not conn.is_connected:
            return  # the subscription went with the connection
        done = asyncio.get_running_loop().create_future()
        try:
            await within(
                self._request(
                    conn, [("UNSUBSCRIBE", channel)], [_Pending(b"unsubscribe", topic, done)], done
                ),
                self._command_timeout_s,
            )
        except SESSION_ERRORS as exc:
            broker_logger.debug("Redis UNSUBSCRIBE %r failed: %r", channel, exc)

    async def publish(self, topic: str, data: bytes) -> str | None:
        client = self._client()
        # Redis drops what is published while this node's subscriber is
        # resubscribing: refused, not acknowledged and lost.
        self._check_ready()
        key = self._key(topic)
        try:
            receivers = await within(execute(client, "PUBLISH", key, data), self._command_timeout_s)
        except ResponseError as exc:
            raise BrokerError(f"Redis refused to publish on {key!r}: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"publish to {self._where()} failed: {exc!r}") from exc
        self._check_delivered(topic, key, receivers)
        self._published += 1
        return None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Every PUBLISH in one MULTI/EXEC: Redis takes the whole batch or none of it."""
        client = self._client()
        self._check_ready()
        keys = [self._key(topic) for topic, _ in messages]
        commands = [("PUBLISH", key, data) for key, (_, data) in zip(keys, messages, strict=True)]
        try:
            replies = await within(execute_multi(client, commands), self._command_timeout_s)
        except ResponseError as exc:
            error = BrokerError(f"Redis refused the batch: {exc}")
            raise BatchPublishError([], len(messages), error) from exc
        except CONNECTION_ERRORS as exc:
            error = BrokerConnectionError(f"publish to {self._where()} failed: {exc!r}")
            raise BatchPublishError([], len(messages), error) from exc
        ids: list[str | None] = []
        for (topic, _), key, receivers in zip(messages, keys, replies, strict=True):
            try:
                self._check_delivered(topic, key, receivers)
            except BrokerConnectionError as exc:
                raise BatchPublishError(ids, len(messages), exc) from None
            ids.append(None)
            self._published += 1
        return ids

    def _check_delivered(self, topic: str, key: bytes, receivers: Any) -> None:
        if topic in self._topics and (not self.ready or int(receivers) < 1):
            # PUBLISH answers how many subscribers got it, and this node is
            # one: none means the server has not got our SUBSCRIBE (it was
            # restarted and the subscriber connection has not noticed yet).
            raise BrokerConnectionError(
                f"Redis delivered the message on {key!r} to no subscriber of this node"
                " (subscriber connection lost)"
            )

    # -- the lifecycle hooks ---------------------------------------------------

    async def _restore(self, conn: AbstractConnection) -> bool:
        """Make ``conn`` the subscriber and SUBSCRIBE every held topic on it,
        reading replies until each is confirmed or refused."""
        self._conn = conn
        topics = list(self._topics.items())
        self._restoring = len(topics)
        if topics:
            await self._send(
                conn,
                [("SUBSCRIBE", channel) for _topic, channel in topics],
                [_Pending(b"subscribe", topic, restore=True) for topic, _channel in topics],
            )
        while self._restoring > 0:
            reply = await within(self._read(conn), self._command_timeout_s)
            if reply is not None:
                self._on_reply(reply)
        return self._conn is conn and conn.is_connected

    async def _serve(self, conn: AbstractConnection) -> str:
        try:
            ping_sent = False
            while True:
                reply = await self._read(conn, self._ping_interval_s)
                if reply is not None:
                    ping_sent = False
                    self._on_reply(reply)
                    continue
                if ping_sent:  # quiet for ping_interval twice
                    return f"no answer to a PING within {self._ping_interval_s}s"
                ping_sent = True
                await self._send(conn, [("PING",)], [_Pending(b"pong")])
        except SESSION_ERRORS as exc:
            return f"lost the connection ({exc})"

    async def _discard(self, conn: AbstractConnection) -> None:
        await super()._discard(conn)
        self._fail_pending("connection to Redis lost")

    # -- replies -----------------------------------------------------------------

    async def _read(self, conn: AbstractConnection, timeout: float | None = None) -> Any:
        """The next reply; a refusal is resolved here (and None returned)."""
        try:
            return await conn.read_response(timeout=timeout)
        except ResponseError as exc:
            self._resolve(None, f"{type(exc).__name__}: {exc}")
            return None

    def _on_reply(self, reply: Any) -> None:
        if isinstance(reply, list) and reply:
            kind = reply[0]
            if kind == b"message" and len(reply) == 3:
                self._deliver(self._by_channel.get(as_bytes(reply[1])), as_bytes(reply[2]))
                return
            if kind in (b"subscribe", b"unsubscribe", b"pong"):
                self._resolve(kind, None)
                return
        elif reply == b"PONG":  # PING outside subscriber mode (no channel held)
            self._resolve(b"pong", None)
            return
        broker_logger.debug("unexpected reply on the Redis subscriber connection: %r", reply)

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
            except CONNECTION_ERRORS as exc:
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


# The config layer types options from the signature: show RedisBase's.
RedisPubSubDriver.__signature__ = options_signature(RedisBase.__init__)  # type: ignore[attr-defined]


def RedisDriver(*, streams: bool = False, **options: Any) -> Driver:
    """The ``redis`` registry entry: a :class:`RedisPubSubDriver`, or with
    ``streams=True`` a :class:`~gochan.drivers.redis_streams.RedisStreamsDriver`.

    Keyword arguments: those of :class:`RedisBase`, those of
    :class:`~gochan.drivers.redis_streams.RedisStreamsDriver` (with
    ``streams=True`` only), and

    streams
        Relay one Redis stream (durable: event ids are entry ids, replay
        from Redis on any node) instead of pub/sub channels.
    """
    if streams:
        return RedisStreamsDriver(**options)
    for option in STREAM_OPTIONS:
        if option in options:
            raise ConfigurationError(
                f"redis {option} is an option of Redis Streams (streams: true)"
            )
    return RedisPubSubDriver(**options)


RedisDriver.__signature__ = options_signature(  # type: ignore[attr-defined]
    RedisDriver, RedisStreamsDriver.__init__, RedisBase.__init__
)
