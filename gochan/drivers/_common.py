"""What several drivers do the same way: wait between reconnection attempts,
check options and topics, bound a broker call, keep passwords out of logs.
The lifecycle they share is :mod:`gochan.drivers._lifecycle`."""

from __future__ import annotations

import asyncio
import logging
import random
import unicodedata
from collections.abc import Awaitable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..client import MAX_TOPIC_BYTES
from ..errors import ClosedError, ConfigurationError, InvalidTopicError
from ..log import broker_logger
from ..waiting import within
from .base import Receiver

__all__ = [
    "backoff",
    "bounded",
    "cancel_and_wait",
    "check_topic_bytes",
    "redact_url",
    "reject_renamed",
    "report_failure",
    "require_backoff",
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


# Options renamed to the drivers' one vocabulary.
RENAMED_OPTIONS = {"reconnect_wait": "reconnect_min", "reconnect_wait_max": "reconnect_max"}


def reject_renamed(driver: str, options: dict[str, Any]) -> None:
    """Refuse the ``options`` a driver's constructor did not take: a renamed
    one with :class:`ConfigurationError` naming its new name, any other as
    Python does (TypeError)."""
    for option in options:
        new = RENAMED_OPTIONS.get(option)
        if new is not None:
            raise ConfigurationError(f"{driver} {option} is now called {new}")
        raise TypeError(f"{driver} driver got an unexpected option {option!r}")


def require_open(closed: bool) -> None:
    """Raise :class:`ClosedError` if the driver is closed."""
    if closed:
        raise ClosedError("driver is closed")


async def bounded(aw: Awaitable[_T], timeout_s: float, broker: str) -> _T:
    """``await aw``, or :class:`TimeoutError` naming ``broker`` after ``timeout_s``."""
    try:
        return await within(aw, timeout_s)
    except asyncio.TimeoutError as exc:  # an alias of TimeoutError from 3.11
        raise TimeoutError(f"no answer from {broker} within {timeout_s}s") from exc


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait until it has ended (nothing for None or the
    calling task itself); an error it ended with other than its cancellation
    is raised here.

    The wait is ``asyncio.wait``, not ``await task``: a caller cancelled while
    it waits is cancelled (its CancelledError is not taken for the task's),
    and ``task`` is not cancelled a second time in the middle of its cleanup.
    An error the task ends with after that has no one to be raised to: it is
    logged when the task ends.
    """
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    try:
        await asyncio.wait((task,))
    except asyncio.CancelledError:
        task.add_done_callback(_log_late_error)
        raise
    error = _ended_with(task)
    if error is not None:
        raise error


def _ended_with(task: asyncio.Task[Any]) -> BaseException | None:
    """The error an ended task raised (retrieved: asyncio does not report it
    again); None if it returned or was cancelled."""
    return None if task.cancelled() else task.exception()


def _log_late_error(task: asyncio.Task[Any]) -> None:
    """The end of a task whose canceller was cancelled before it ended."""
    error = _ended_with(task)
    if error is not None:
        broker_logger.warning("%s failed while it was being stopped: %r", task.get_name(), error)


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
