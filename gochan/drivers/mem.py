"""The in-memory driver: the embedded default and the reference driver.

Messages never leave the process. It keeps the same contract as a broker
driver (one subscription per topic, delivery only for subscribed topics) so
that the streamer cannot tell the difference. It numbers nothing: the
streamer does, and publish returns that id (None when no client holds the
topic, so nothing was sent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..errors import BatchPublishError, ClosedError
from ..topicset import TopicSet
from .base import Receiver

__all__ = ["MemDriver"]


class MemDriver:
    name: ClassVar[str] = "mem"

    def __init__(self) -> None:
        self._receiver: Receiver | None = None
        self._topics: TopicSet = TopicSet()
        self._closed = False
        self.published = 0
        self._received = 0
        # Subscribing needs no round trip here (see base.py), unless a
        # subclass changes subscribe() (a test double that refuses some
        # topics, say): then it is awaited, as a broker driver's is.
        self.subscribe_nowait: Callable[[str], None] | None = (
            self._topics.add if type(self).subscribe is MemDriver.subscribe else None
        )

    @property
    def ready(self) -> bool:
        return self._receiver is not None and not self._closed

    @property
    def topics(self) -> frozenset[str]:
        """The topics this process holds a subscription for."""
        return frozenset(self._topics)

    def stats(self) -> dict[str, Any]:
        """The keys every driver's ``stats()`` has (see ``_lifecycle.Lifecycle``)."""
        return {
            "driver": self.name,
            "state": "closed" if self._closed else "ready" if self.ready else "idle",
            "ready": self.ready,
            "subscriptions": len(self._topics),
            "reconnects": 0,
            "published": self.published,
            "received": self._received,
            "failures": 0,
            "stray": 0,
            "broker": {},
        }

    def check_topic(self, topic: str) -> None:
        return None  # any protocol-valid topic is fine in memory

    async def connect(self, receiver: Receiver) -> None:
        if self._closed:
            raise ClosedError("driver is closed")
        self._receiver = receiver

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    def publish_nowait(self, topic: str, data: bytes) -> str | None:
        """Publish without a round trip (there is no broker to wait for)."""
        if self._closed or self._receiver is None:
            raise ClosedError("driver is not connected")
        self.published += 1
        if topic in self._topics:
            self._received += 1
            return self._receiver.on_message(topic, data, None)
        return None

    async def publish(self, topic: str, data: bytes) -> str | None:
        return self.publish_nowait(topic, data)

    def publish_many_nowait(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Publish a batch in one pass of the loop: no other task runs between
        its messages."""
        if self._closed or self._receiver is None:
            raise BatchPublishError([], len(messages), ClosedError("driver is not connected"))
        publish = self.publish_nowait
        return [publish(topic, data) for topic, data in messages]

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        return self.publish_many_nowait(messages)

    async def close(self) -> None:
        self._closed = True
        self._topics.clear()
        self._receiver = None
