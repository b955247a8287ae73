"""The RabbitMQ driver (AMQP 0-9-1, through aio-pika).

RabbitMQ is a queue broker: two consumers of one queue compete for its
messages. gochan needs fan-out (every process receives every message of the
topics it holds), so the driver builds it the broker's way:

- one durable **topic exchange** shared by every gochan process (``exchange``,
  default ``"gochan"``), declared by whoever connects first;
- per process, one **exclusive, auto-delete, server-named queue**, consumed
  without acks (messages are transient: a browser that misses one replays it
  from the streamer's history, not from the broker);
- ``subscribe(topic)`` binds that queue to the exchange with the topic as the
  binding key, ``unsubscribe(topic)`` removes the binding. One binding per
  topic per process, whatever the number of local clients.

``publish(topic, data)`` publishes ``data`` to the exchange with the topic as
the routing key, with publisher confirms (it returns once the broker has taken
the message). Any AMQP client can do the same (``basic_publish`` to the
exchange); the body reaches browsers byte for byte, properties are ignored.

Topic mapping: the routing key *is* the topic, unchanged. A topic is refused
(:class:`~gochan.errors.InvalidTopicError`) when it cannot be one:

- longer than 255 bytes in UTF-8 (an AMQP short string);
- one of its ``.``-separated words is exactly ``*`` or ``#``: in a binding key
  those words are wildcards, so the binding would match other topics. ``*`` and
  ``#`` inside a longer word (``chat#1``, ``a*b``) are literal and allowed.

Connection loss (broker restart, network cut, a channel error, a server-side
``close_connection``): ``ready`` turns False, the driver reconnects with
exponential backoff and jitter, re-declares the exchange and a new queue,
re-binds every topic it held and counts one reconnect. A topic whose binding
is refused on the new connection is dropped and reported through
``Receiver.on_subscription_failure``; a topic is never reported for a mere
connection failure. Messages published while the connection is down are lost
for this process.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import AMQPChannelError
from yarl import URL

from ..errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)
from ..log import broker_logger
from ..topicset import TopicSet
from ..waiting import within
from ._common import check_topic_bytes, require_positive
from ._lifecycle import Lifecycle

__all__ = ["RabbitMQDriver"]

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_EXCHANGE = "gochan"
DEFAULT_CONNECTION_NAME = "gochan"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 10.0

MAX_ROUTING_KEY_BYTES = 255  # AMQP short string
MAX_EXCHANGE_NAME_BYTES = 255
_WILDCARD_WORDS = frozenset({"*", "#"})


class _Session:
    """One connection with its channel, exchange and queue."""

    def __init__(
        self,
        connection: AbstractConnection,
        channel: AbstractChannel,
        exchange: AbstractExchange,
        queue: AbstractQueue,
        consumer_tag: str,
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange
        self.queue = queue
        self.consumer_tag = consumer_tag
        self.lost = asyncio.Event()

    def mark_lost(self, *_args: object) -> None:
        self.lost.set()

    @property
    def usable(self) -> bool:
        return not (self.lost.is_set() or self.connection.is_closed or self.channel.is_closed)

    async def close(self, timeout: float, *, delete_queue: bool) -> None:
        self.lost.set()
        if delete_queue and not (self.connection.is_closed or self.channel.is_closed):
            try:
                # Cancelled first, or the broker warns that it cancelled it.
                await self.queue.cancel(self.consumer_tag, timeout=timeout)
                await self.queue.delete(if_unused=False, if_empty=False, timeout=timeout)
            except Exception as exc:  # the queue goes with the connection anyway
                broker_logger.debug("rabbitmq: could not delete queue %s: %r", self.queue.name, exc)
        try:
            await within(self.connection.close(), timeout)
        except Exception as exc:
            broker_logger.debug("rabbitmq: error closing the connection: %r", exc)


class RabbitMQDriver(Lifecycle[_Session]):
    """Fan-out over a RabbitMQ topic exchange (see the module docstring).

    Keyword arguments (all optional; the config layer maps ``url`` to
    ``--rabbitmq-url`` and ``GOCHAN_RABBITMQ_URL``, and so on):

    ``url``
        AMQP URL, ``amqp://user:password@host:port/vhost`` (``amqps://`` for
        TLS). URL query options of aio-pika/aiormq apply, for example
        ``?heartbeat=30``. Default ``amqp://guest:guest@127.0.0.1:5672/``.
    ``exchange``
        Name of the durable topic exchange shared by every gochan process and
        by other publishers. Default ``"gochan"``. Must not be empty nor start
        with ``amq.`` (reserved by the broker).
    ``connection_name``
        Name shown for the connection in the management UI and by
        ``rabbitmqctl list_connections`` (a ``?name=`` in the URL wins).
        Default ``"gochan"``.
    ``timeout``
        Seconds to wait for any broker operation (connecting, binding,
        publishing) before failing with :class:`~gochan.errors.BrokerError`.
        Default 5.
    ``reconnect_min``, ``reconnect_max``
        Bounds, in seconds, of the exponential backoff between reconnection
        attempts. Defaults 0.1 and 10.
    """

    name: ClassVar[str] = "rabbitmq"
    broker: ClassVar[str] = "RabbitMQ"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        exchange: str = DEFAULT_EXCHANGE,
        connection_name: str = DEFAULT_CONNECTION_NAME,
        timeout: float = DEFAULT_TIMEOUT_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if not exchange or exchange.startswith("amq."):
            raise ConfigurationError(
                f"invalid RabbitMQ exchange name {exchange!r}: empty or reserved (amq.*)"
            )
        if len(exchange.encode("utf-8", "surrogatepass")) > MAX_EXCHANGE_NAME_BYTES:
            raise ConfigurationError(
                f"RabbitMQ exchange name longer than {MAX_EXCHANGE_NAME_BYTES}"
            )
        require_positive("rabbitmq", timeout=timeout)
        self._url = url
        self._exchange_name = exchange
        self._connection_name = connection_name
        self._timeout = float(timeout)
        super().__init__(reconnect_min, reconnect_max)
        self._topics: TopicSet = TopicSet()
        self._session: _Session | None = None

    # -- Driver protocol -------------------------------------------------

    @property
    def queue_name(self) -> str | None:
        """The server-named queue of the current connection (None when down)."""
        return self._session.queue.name if self._session is not None else None

    def check_topic(self, topic: str) -> None:
        raw = check_topic_bytes(topic)
        if len(raw) > MAX_ROUTING_KEY_BYTES:
            raise InvalidTopicError(
                topic, f"longer than {MAX_ROUTING_KEY_BYTES} bytes (AMQP routing key limit)"
            )
        if _WILDCARD_WORDS.intersection(topic.split(".")):
            raise InvalidTopicError(
                topic, "a '.'-separated word is '*' or '#' (AMQP binding wildcards)"
            )

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        session = self._usable_session()
        if topic in self._topics:
            return
        # Added first, so that a message routed between the broker's BindOk and
        # our return is not dropped by the filter in _on_amqp_message.
        self._topics.add(topic)
        try:
            await session.queue.bind(session.exchange, topic, timeout=self._timeout)
        except BaseException as exc:
            self._topics.discard(topic)
            if isinstance(exc, Exception):
                session.mark_lost()  # the channel's state is unknown: start afresh
                raise BrokerError(f"cannot bind {topic!r} on RabbitMQ: {exc!r}") from exc
            raise

    async def unsubscribe(self, topic: str) -> None:
        if topic not in self._topics:
            return
        # Forgotten at once: nothing more is delivered for it, even if the
        # unbind below fails (the binding then dies with the connection).
        self._topics.discard(topic)
        session = self._session
        if session is None or not self.ready or not session.usable:
            return  # the queue, and so the binding, is gone with the connection
        try:
            await session.queue.unbind(session.exchange, topic, timeout=self._timeout)
        except Exception as exc:
            session.mark_lost()
            raise BrokerError(f"cannot unbind {topic!r} on RabbitMQ: {exc!r}") from exc

    async def publish(self, topic: str, data: bytes) -> str | None:
        self.check_topic(topic)
        session = self._usable_session()
        message = aio_pika.Message(body=bytes(data))
        try:
            # mandatory=False: a topic nobody holds is not an error.
            await session.exchange.publish(
                message, routing_key=topic, mandatory=False, timeout=self._timeout
            )
        except Exception as exc:
            if not session.usable:
                raise BrokerConnectionError(
                    f"RabbitMQ connection lost while publishing on {topic!r}: {exc!r}"
                ) from exc
            raise BrokerError(f"cannot publish on {topic!r} to RabbitMQ: {exc!r}") from exc
        self._published += 1
        return None

    async def _close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close(self._timeout, delete_queue=True)
        self._topics.clear()

    # -- internals ---------------------------------------------------------

    def _usable_session(self) -> _Session:
        self._check_ready()
        session = self._session
        if session is None or not session.usable:
            raise BrokerConnectionError("not connected to RabbitMQ (reconnecting)")
        return session

    async def _open(self) -> _Session:
        url = URL(self._url)
        if "name" not in url.query:  # aiormq's way to name the connection
            url = url.update_query(name=self._connection_name)
        connection = await aio_pika.connect(url, timeout=self._timeout)
        try:
            channel = connection.channel(publisher_confirms=True)
            await within(channel.initialize(), self._timeout)
            exchange = await channel.declare_exchange(
                self._exchange_name,
                aio_pika.ExchangeType.TOPIC,
                durable=True,
                timeout=self._timeout,
            )
            queue = await channel.declare_queue(
                "", exclusive=True, auto_delete=True, timeout=self._timeout
            )
            tag = await queue.consume(self._on_amqp_message, no_ack=True, timeout=self._timeout)
            session = _Session(connection, channel, exchange, queue, tag)
            connection.close_callbacks.add(session.mark_lost)
            channel.close_callbacks.add(session.mark_lost)
        except BaseException:
            with contextlib.suppress(Exception):
                await within(connection.close(), self._timeout)
            raise
        broker_logger.debug(
            "rabbitmq: connected, exchange %s, queue %s", self._exchange_name, queue.name
        )
        return session

    async def _on_amqp_message(self, message: AbstractIncomingMessage) -> None:
        # The filter drops what a binding being removed (or restored for a
        # topic unsubscribed meanwhile) still lets through.
        self._deliver(message.routing_key, message.body)

    async def _serve(self, session: _Session) -> str:
        await session.lost.wait()
        return "connection lost"

    async def _restore(self, session: _Session) -> bool:
        """Make ``session`` current and bind every held topic again; False when
        the session broke meanwhile."""
        self._session = session
        for topic in list(self._topics):
            if topic not in self._topics:
                continue  # unsubscribed meanwhile
            try:
                await session.queue.bind(session.exchange, topic, timeout=self._timeout)
            except Exception as exc:
                if session.connection.is_closed or not isinstance(exc, AMQPChannelError):
                    # The connection failed, not the topic: keep it, retry later.
                    broker_logger.warning("rabbitmq: restore interrupted: %r", exc)
                    return False
                # The broker refused this binding (and closed the channel).
                self._topics.discard(topic)
                self._report_failure(topic, f"cannot restore the RabbitMQ binding: {exc}")
                return False
            if topic not in self._topics:  # unsubscribed while we restored it
                try:
                    await session.queue.unbind(session.exchange, topic, timeout=self._timeout)
                except Exception as exc:
                    broker_logger.warning("rabbitmq: restore interrupted: %r", exc)
                    return False
        return session.usable

    async def _discard(self, session: _Session) -> None:
        """Drop a lost session, or a new one that failed while being restored."""
        await session.close(self._timeout, delete_queue=False)
