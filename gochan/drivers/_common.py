"""What several drivers do the same way: wait between reconnection attempts,
check options and topics, bound a broker call, keep passwords out of logs;
and the bookkeeping of the drivers that hold their topics on one supervised
connection (:class:`SupervisedDriver`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..client import MAX_TOPIC_BYTES
from ..errors import ClosedError, ConfigurationError, InvalidTopicError
from ..log import broker_logger
from .base import Receiver

__all__ = [
    "SupervisedDriver",
    "backoff",
    "bounded",
    "cancel_and_wait",
    "check_topic_bytes",
    "redact_url",
    "report_failure",
    "require_backoff",
    "require_connected",
    "require_open",
    "require_positive",
]

_T = TypeVar("_T")
_C = TypeVar("_C")

# 2**30 times any sensible base is past any sensible cap.
_MAX_DOUBLINGS = 30


def backoff(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with jitter: in [d/2, d], d = min(cap, base * 2**attempt)."""
    delay = min(cap_s, base_s * 2 ** min(attempt, _MAX_DOUBLINGS))
    return random.uniform(delay / 2, delay)


def require_positive(driver: str, **options: float) -> None:
    """Raise :class:`ConfigurationError` for the first of ``options`` not above 0."""
    for option, value in options.items():
        if value <= 0:
            raise ConfigurationError(f"{driver} {option} must be positive, not {value!r}")


def require_backoff(driver: str, reconnect_min: float, reconnect_max: float) -> None:
    """Raise :class:`ConfigurationError` if ``reconnect_max`` is below ``reconnect_min``."""
    if reconnect_max < reconnect_min:
        raise ConfigurationError(f"{driver} reconnect_max must not be below reconnect_min")


def require_open(closed: bool) -> None:
    """Raise :class:`ClosedError` if the driver is closed."""
    if closed:
        raise ClosedError("driver is closed")


def require_connected(closed: bool, receiver: Receiver | None) -> None:
    """Raise :class:`ClosedError` unless the driver is connected and not closed."""
    require_open(closed)
    if receiver is None:
        raise ClosedError("driver is not connected")


async def bounded(aw: Awaitable[_T], timeout_s: float, broker: str) -> _T:
    """``await aw``, or :class:`TimeoutError` naming ``broker`` after ``timeout_s``."""
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except asyncio.TimeoutError as exc:  # an alias of TimeoutError from 3.11
        raise TimeoutError(f"no answer from {broker} within {timeout_s}s") from exc


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended (nothing for None or the
    calling task itself)."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def redact_url(url: str) -> str:
    """``url`` without its password, for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def report_failure(
    driver: str,
    receiver: Receiver | None,
    topic: str,
    message: str,
    level: int = logging.WARNING,
) -> None:
    """The subscription for ``topic`` is lost: log it and tell ``receiver``
    (a receiver that fails on it is logged, not raised)."""
    broker_logger.log(level, "%s: subscription to %r lost: %s", driver, topic, message)
    if receiver is None:
        return
    try:
        receiver.on_subscription_failure(topic, message)
    except Exception:
        broker_logger.exception("%s: receiver failed on the failure of %r", driver, topic)


def check_topic_bytes(topic: str) -> bytes:
    """``topic`` in UTF-8 if gochan's own rules allow it (1..256 UTF-8
    bytes, no control characters), else :class:`InvalidTopicError`."""
    try:
        raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTopicError(topic, "not encodable as UTF-8") from None
    if not raw:
        raise InvalidTopicError(topic, "empty")
    if len(raw) > MAX_TOPIC_BYTES:
        raise InvalidTopicError(topic, f"longer than {MAX_TOPIC_BYTES} bytes")
    if any(unicodedata.category(ch) == "Cc" for ch in topic):
        raise InvalidTopicError(topic, "contains a control character")
    return raw


class SupervisedDriver:
    """The bookkeeping of a driver that holds a set of topics on one
    connection, watched by a supervisor task that reconnects when it is lost
    (MQTT, PostgreSQL, RabbitMQ): flags, counters, :meth:`stats`, the
    reconnection loop and failure reports."""

    name: ClassVar[str]

    def __init__(self, reconnect_min: float, reconnect_max: float) -> None:
        self._reconnect_min = float(reconnect_min)
        self._reconnect_max = float(reconnect_max)
        self._receiver: Receiver | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._topics: set[str] = set()
        self._ready = False
        self._closed = False
        self._reconnects = 0
        self._published = 0
        self._received = 0
        self._failures = 0
        self._stray = 0  # broker messages for topics not held (dropped)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def topics(self) -> frozenset[str]:
        """The topics this process holds a subscription for."""
        return frozenset(self._topics)

    def stats(self) -> dict[str, Any]:
        """``reconnects`` (connections restored after a loss), ``subscriptions``
        (topics held), ``published``, ``received`` (delivered to the
        receiver), ``subscription_failures``, ``stray`` (messages the broker
        sent for topics not held, dropped) and ``connected``."""
        return {
            "reconnects": self._reconnects,
            "subscriptions": len(self._topics),
            "published": self._published,
            "received": self._received,
            "subscription_failures": self._failures,
            "stray": self._stray,
            "connected": self._ready,
        }

    def _check_open(self) -> None:
        require_open(self._closed)

    async def _shut_down(self) -> bool:
        """The first half of ``close``: mark the driver closed and stop the
        supervisor; False when it was closed already."""
        if self._closed:
            return False
        self._closed = True
        self._ready = False
        supervisor, self._supervisor = self._supervisor, None
        await cancel_and_wait(supervisor)
        return True

    async def _reconnect(
        self,
        open_connection: Callable[[], Awaitable[_C]],
        restore: Callable[[_C], Awaitable[bool]],
        discard: Callable[[_C], Awaitable[None]],
    ) -> _C:
        """Connect again and restore every held topic on the new connection,
        waiting :func:`backoff` before each attempt, until both succeed;
        returns the connection, the driver ready again.

        ``restore`` returns False (or raises) when the connection failed
        meanwhile: the connection is then discarded and the attempt repeated.
        """
        attempt = 0
        while True:
            await asyncio.sleep(backoff(attempt, self._reconnect_min, self._reconnect_max))
            attempt += 1
            try:
                conn = await open_connection()
            except Exception as exc:
                broker_logger.warning(
                    "%s: reconnection attempt %d failed: %r", self.name, attempt, exc
                )
                continue
            try:
                restored = await restore(conn)
            except Exception as exc:
                broker_logger.warning("%s: restore interrupted: %r", self.name, exc)
                restored = False
            if restored:
                break
            await discard(conn)
        self._reconnects += 1
        self._ready = True
        broker_logger.info("%s: reconnected, %d topics restored", self.name, len(self._topics))
        return conn

    def _report_failure(self, topic: str, message: str) -> None:
        """The subscription for ``topic`` is lost: count, log, tell the receiver."""
        self._failures += 1
        report_failure(self.name, self._receiver, topic, message, logging.ERROR)
