"""Exceptions, grouped by who is at fault.

They mix in builtins so that ``except ValueError`` keeps working for callers
who do not know gochan's own classes.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BatchPublishError",
    "BrokerConnectionError",
    "BrokerError",
    "ClientExistsError",
    "ClosedError",
    "ClusterError",
    "ClusterTimeoutError",
    "ConfigurationError",
    "GochanError",
    "InterfaceError",
    "InvalidClientIdError",
    "InvalidTopicError",
    "LimitExceededError",
    "MissingExtraError",
    "PeerLimitError",
    "ReplayGapError",
    "UnknownClientError",
]


class GochanError(Exception):
    """Base class of every gochan error."""


class InterfaceError(GochanError):
    """The caller used gochan wrongly (bad argument, bad state)."""


class ConfigurationError(InterfaceError, ValueError):
    """A configuration value is invalid."""


class MissingExtraError(ConfigurationError, ImportError):
    """A driver's client library is not installed (``pip install gochan[EXTRA]``)."""


class InvalidTopicError(InterfaceError, ValueError):
    """A topic name breaks the rules of the protocol (or of the driver)."""

    def __init__(self, topic: str, reason: str) -> None:
        super().__init__(f"invalid topic {topic!r}: {reason}")
        self.topic = topic
        self.reason = reason


class InvalidClientIdError(InterfaceError, ValueError):
    """A client id is not 1..128 URL-safe characters."""


class UnknownClientError(InterfaceError, KeyError):
    """No client has that id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "unknown client"


class ClientExistsError(InterfaceError, ValueError):
    """A custom client was asked for with an id that is taken."""


class LimitExceededError(InterfaceError, ValueError):
    """A configured limit (topics per client, clients, ...) would be passed."""


class PeerLimitError(LimitExceededError):
    """One address (or identity) has used up its share of a limit."""


class AuthError(GochanError):
    """A request is refused by authorization: ``status`` (401 without valid
    credentials, 403 when they do not allow it) and ``reason``, the plain
    text answer. What an ``authorize`` hook raises to refuse."""

    def __init__(self, status: int = 401, reason: str = "unauthorized") -> None:
        if not 400 <= status < 600:
            raise ValueError(f"an authorization refusal needs an HTTP error status, got {status}")
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BrokerError(GochanError):
    """The broker refused or failed an operation."""


class BatchPublishError(BrokerError):
    """A batch publish stopped partway. ``ids`` are the event ids of the
    messages known to be published, the batch's first ``len(ids)`` in order
    (``None`` where the broker numbers later); the rest were not acknowledged
    (some of them may still have reached the broker). ``error`` is what
    stopped it, and says who is at fault: a :class:`BrokerError` or
    :class:`ClosedError`, or an :class:`InterfaceError` for a message the
    broker cannot carry."""

    def __init__(self, ids: list[str | None], total: int, error: GochanError) -> None:
        super().__init__(f"{error} (after {len(ids)} of {total} messages)")
        self.ids = ids
        self.total = total
        self.error = error


class ReplayGapError(BrokerError):
    """Messages after a Last-Event-ID are no longer kept: replay would have a hole."""


class BrokerConnectionError(BrokerError, ConnectionError):
    """The broker cannot be reached."""


class ClusterError(BrokerError):
    """The cluster store refused or failed an operation."""


class ClusterTimeoutError(ClusterError):
    """A node holding a client's stream did not acknowledge an update in time."""


class ClosedError(GochanError):
    """The streamer or driver is closed."""
