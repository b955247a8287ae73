"""The Driver protocol: where messages come from.

A driver holds ONE broker subscription per topic for the whole process; the
streamer opens it with the first local subscriber and closes it after the last
one leaves, and fans messages out locally. Every process that holds a topic
receives every message of it (never competing consumers).

Drivers call back into a :class:`Receiver` (the streamer) from the event loop's
thread. ``on_message`` must not be awaited and must not block: it encodes the
frame once and queues it on every subscribed connection.

Three methods are optional. ``publish_nowait(topic, data)`` and
``subscribe_nowait(topic)``: a driver that needs no round trip (the
in-memory one) publishes and subscribes without awaiting, so a connect on
a topic nobody held yet needs no task. ``publish_many(messages)``
(:class:`BatchDriver`): a batch in one go, where the broker batches
natively (one flush, one pipeline); drivers without it get
:func:`publish_each`, a loop over ``publish``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

from ..errors import BatchPublishError, GochanError

__all__ = ["BatchDriver", "Driver", "DurableDriver", "Receiver", "publish_each"]


class Receiver(Protocol):
    """What a driver delivers to (implemented by :class:`gochan.Streamer`)."""

    def on_message(self, topic: str, data: bytes, event_id: str | None) -> str:
        """A message arrived on ``topic``; returns the event id it was sent with.

        ``event_id`` is the broker's position for it when the broker has one
        (a JetStream sequence, a stream entry id); ``None`` lets the streamer
        number it (and keep it for Last-Event-ID replay).
        """

    def on_subscription_failure(self, topic: str, message: str) -> None:
        """The broker subscription for ``topic`` failed after it had been made
        (for example it could not be restored after a reconnect)."""


@runtime_checkable
class Driver(Protocol):
    """A broker binding. See ``gochan.drivers.mem.MemDriver`` for the reference."""

    name: ClassVar[str]

    @property
    def ready(self) -> bool:
        """True while the broker connection is usable (``/readyz``)."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``/metrics`` (for example ``reconnects``)."""

    def check_topic(self, topic: str) -> None:
        """Raise :class:`gochan.errors.InvalidTopicError` if ``topic`` cannot be
        mapped to the broker's naming rules. Must not do I/O."""

    async def connect(self, receiver: Receiver) -> None:
        """Connect to the broker; deliver messages to ``receiver`` from now on."""

    async def subscribe(self, topic: str) -> None:
        """Open the process's subscription for ``topic``.

        Returns once messages published after it returns are sure to be
        delivered. Raises :class:`gochan.errors.BrokerError` on failure.
        Called at most once per topic until :meth:`unsubscribe`.
        """

    async def unsubscribe(self, topic: str) -> None:
        """Close the process's subscription for ``topic``."""

    async def publish(self, topic: str, data: bytes) -> str | None:
        """Publish ``data`` on ``topic`` so every process holding it receives it.

        Returns the event id when the broker assigns one at publish time.
        """

    async def close(self) -> None:
        """Close every subscription and the connection; idempotent."""


@runtime_checkable
class BatchDriver(Driver, Protocol):
    """A driver that publishes a batch natively (pipelined, one flush)."""

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Publish ``messages`` (topic, data) in order: the same as
        :meth:`Driver.publish` on each, with the broker's own batching.

        Returns one event id per message, in order (``None`` where the
        broker numbers later). The topics are already checked. On a failure
        raises :class:`gochan.errors.BatchPublishError` carrying the ids of
        the messages known to be published, a prefix of the batch: never
        return while some message was not taken.
        """


async def publish_each(driver: Driver, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
    """The batch of a driver without ``publish_many``: ``publish`` each
    message in turn, stopping at the first failure
    (:class:`~gochan.errors.BatchPublishError` with the ids published)."""
    ids: list[str | None] = []
    for topic, data in messages:
        try:
            ids.append(await driver.publish(topic, data))
        except GochanError as exc:
            raise BatchPublishError(ids, len(messages), exc) from exc
    return ids


@runtime_checkable
class DurableDriver(Driver, Protocol):
    """A driver whose broker keeps messages (JetStream, Redis Streams, Kafka)
    and numbers them, so Last-Event-ID replay can read them back on any node
    and after a restart.

    Its event ids name broker positions; ``replay`` reads what came after
    one. Messages it delivers live carry the same ids, so the streamer can
    join replay and live delivery without a gap or a duplicate.
    """

    @property
    def durable(self) -> bool:
        """True when this instance keeps messages (a driver may offer a
        durable mode, like NATS with or without JetStream)."""

    def event_position(self, event_id: str) -> int | None:
        """The broker position ``event_id`` names, or None if it is not one of
        this driver's ids (another driver's, another stream's, garbage).
        Positions only grow in publish order."""

    def replay(
        self, topics: Sequence[str], after: int
    ) -> AsyncGenerator[tuple[str, bytes, str], None]:
        """Messages on ``topics`` after position ``after`` as (topic, data,
        event id), in position order, through at least the newest message
        this process had delivered live when it was called (what comes later
        is held and sent after the replay). Live frames that arrive after
        the hand-off are not checked against the replay, so a driver whose
        live delivery can lag behind the broker (Kafka) stops there.

        Raises :class:`gochan.errors.ReplayGapError` before yielding anything
        when some of those messages are no longer kept (or the position is
        from the future), and :class:`gochan.errors.BrokerError` on failure.
        """
