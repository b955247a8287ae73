"""Subscriptions: which topics some client here holds, and the one driver
subscription per such topic, however many clients hold it. No I/O of its own
but the driver calls it makes, one at a time per topic."""

from __future__ import annotations

from collections.abc import Callable

from .drivers import Driver
from .errors import BrokerError
from .history import History
from .locks import KeyedLocks
from .log import logger
from .topicset import TopicSet

__all__ = ["Subscriptions"]


class Subscriptions:
    """Topic reference counts and the driver's subscriptions kept in line
    with them."""

    def __init__(self, driver: Driver, history: History, *, sees_every_publish: bool) -> None:
        self.driver = driver
        self.history = history
        # In memory every publish goes through this process, so a message on
        # a topic nobody holds is seen being lost; with a broker it is not.
        self.sees_every_publish = sees_every_publish
        self.refs: dict[str, int] = {}  # topic -> clients holding it
        self.subscribed = TopicSet()  # topics the driver is subscribed to
        self._locks: KeyedLocks[str] = KeyedLocks()
        # A driver that subscribes without a round trip (the in-memory one).
        self._subscribe_nowait: Callable[[str], None] | None = getattr(
            driver, "subscribe_nowait", None
        )

    def held(self, topic: str) -> bool:
        """Some client here holds ``topic``."""
        return topic in self.refs

    def hold_now(self, topics: list[str]) -> bool:
        """Count ``topics`` held without awaiting, when the driver holds every
        one of them already, or can subscribe to the others without awaiting
        and no driver call on them is under way; False, with nothing
        changed, otherwise."""
        subscribed = self.subscribed
        if not subscribed.issuperset(topics):
            subscribe = self._subscribe_nowait
            if subscribe is None:
                return False
            missing = [t for t in dict.fromkeys(topics) if t not in subscribed]
            if any(self._locks.busy(t) for t in missing):
                return False  # reconcile() is at it: it has the last word
            for topic in missing:
                subscribe(topic)
                subscribed.add(topic)
        refs = self.refs
        gaps = not self.sees_every_publish
        for topic in topics:
            held = refs.get(topic, 0)
            if not held and gaps:
                # As acquire() does for a first holder: while nobody held it
                # (its unsubscribe pending), what came on it was not kept.
                self.history.mark_gap(topic)
            refs[topic] = held + 1
        return True

    async def acquire(self, topic: str) -> None:
        """One more client holds ``topic``: the driver subscribes if it is
        the first (raises BrokerError, with nothing counted, if it cannot)."""
        refs = self.refs[topic] = self.refs.get(topic, 0) + 1
        if refs == 1 and not self.sees_every_publish:
            # While nobody held it, other publishers' messages on it went
            # nowhere and we cannot know whether there were any.
            self.history.mark_gap(topic)
        if topic in self.subscribed:
            return
        try:
            await self.reconcile(topic)
        except BaseException:
            self._drop(topic)
            raise

    async def release(self, topic: str) -> None:
        """One client fewer holds ``topic``: the driver unsubscribes after the last."""
        self._drop(topic)
        if topic not in self.refs and topic in self.subscribed:
            try:
                await self.reconcile(topic)
            except BrokerError as exc:
                logger.warning("unsubscribe from %r failed: %s", topic, exc)

    def lost(self, topic: str) -> None:
        """The broker lost its subscription to ``topic``."""
        self.subscribed.discard(topic)

    def _drop(self, topic: str) -> None:
        refs = self.refs.get(topic, 0) - 1
        if refs > 0:
            self.refs[topic] = refs
        else:
            self.refs.pop(topic, None)

    async def reconcile(self, topic: str) -> None:
        """Bring the driver in line with whether any client holds ``topic``
        now; one driver call at a time per topic."""
        async with self._locks.hold(topic):
            wanted = topic in self.refs
            held = topic in self.subscribed
            if wanted and not held:
                await self.driver.subscribe(topic)
                self.subscribed.add(topic)
            elif held and not wanted:
                self.subscribed.discard(topic)
                await self.driver.unsubscribe(topic)
