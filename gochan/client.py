"""Client: an identity and a set of topics. No I/O here.

A client id is a bearer credential: whoever knows it can read the client's
stream and change its subscriptions. Generated ids carry 144 random bits.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

from .errors import InvalidClientIdError, InvalidTopicError

if TYPE_CHECKING:
    from .stream import Stream

__all__ = [
    "MAX_CLIENT_ID_CHARS",
    "MAX_TOPIC_BYTES",
    "RESERVED_TOPIC",
    "Client",
    "TopicError",
    "new_client_id",
    "validate_client_id",
    "validate_topic",
]

MAX_TOPIC_BYTES = 256
MAX_CLIENT_ID_CHARS = 128
RESERVED_TOPIC = "message"  # system frames use this event name
CLIENT_ID_RANDOM_BYTES = 18  # 144 bits, base64url: 24 characters
# Up to this many topics a client keeps them in a tuple (searched in order),
# above it in a dict.
SMALL_TOPICS = 16
# Client._flags
_CLOSED = 1
_SHARED = 2

_CLIENT_ID = re.compile(rf"[A-Za-z0-9._~-]{{1,{MAX_CLIENT_ID_CHARS}}}")
# C0 and C1 control characters and DEL: they would break the SSE framing
# (CR, LF) or confuse logs and brokers.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# Ids are cut from one urandom read of this many, so that a connect storm
# makes one getrandom call per batch instead of one per client. Each id is
# still 18 bytes of its own from the OS's CSPRNG; a forked child starts a
# batch of its own (two processes must never hand out the same ids).
CLIENT_IDS_PER_READ = 128
_CLIENT_ID_CHARS = CLIENT_ID_RANDOM_BYTES * 4 // 3
_unused_ids: list[str] = []
os.register_at_fork(after_in_child=_unused_ids.clear)


def new_client_id() -> str:
    """A fresh unguessable, URL-safe client id (secrets.token_urlsafe without
    its padding strip: 18 bytes are 24 characters, with none)."""
    if not _unused_ids:
        raw = os.urandom(CLIENT_ID_RANDOM_BYTES * CLIENT_IDS_PER_READ)
        # 18 bytes are whole base64 groups: the text of the batch is the
        # ids' texts end to end.
        text = base64.urlsafe_b64encode(raw).decode("ascii")
        size = _CLIENT_ID_CHARS
        _unused_ids.extend(text[at : at + size] for at in range(0, len(text), size))
    return _unused_ids.pop()


def validate_client_id(client_id: object) -> str:
    """Return ``client_id`` if it is 1..128 URL-safe characters, else raise."""
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise InvalidClientIdError(
            f"client id must be 1..{MAX_CLIENT_ID_CHARS} characters of A-Z a-z 0-9 . _ ~ -"
        )
    return client_id


def validate_topic(topic: object) -> str:
    """Return ``topic`` if the protocol allows it, else raise InvalidTopicError."""
    if not isinstance(topic, str):
        raise InvalidTopicError(repr(topic), "a topic must be a string")
    if not topic:
        raise InvalidTopicError(topic, "a topic cannot be empty")
    if (
        len(topic) > MAX_TOPIC_BYTES
        or len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES
    ):
        raise InvalidTopicError(topic[:32] + "...", f"longer than {MAX_TOPIC_BYTES} bytes")
    if _CONTROL.search(topic):
        raise InvalidTopicError(topic, "control characters are not allowed")
    if topic == RESERVED_TOPIC:
        raise InvalidTopicError(topic, f"{RESERVED_TOPIC!r} is reserved for system frames")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTopicError(topic, "not valid UTF-8 (lone surrogate)") from None
    return topic


class TopicError(NamedTuple):
    """One topic of an update that could not be applied."""

    topic: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"topic": self.topic, "code": self.code, "message": self.message}


class Client:
    """A client: its id, its topics in subscription order and its live streams."""

    # Eight slots: one per idle connection, so it fits a 96-byte allocation
    # (bench/profiles/connection_memory.md); closed and shared share one.
    __slots__ = (
        "_flags",
        "_streams",
        "_topics",
        "armed",
        "expires_at",
        "id",
        "identity",
        "peer",
    )

    def __init__(self, client_id: str, peer: str = "", identity: str | None = None) -> None:
        self.id = client_id
        # The identity (a token's sub) that made it, None without authorization:
        # the client answers to that identity only.
        self.identity = identity
        # The address that made it by connecting without an id ("" for the
        # embedding API): its per-peer share is counted against that address.
        self.peer = peer
        # A tuple while it is short (a third of a dict's size, for the one to
        # ten topics most clients hold), a dict once it passes SMALL_TOPICS.
        self._topics: tuple[str, ...] | dict[str, None] = ()
        # None, the one stream (most clients have one) or a tuple of them.
        self._streams: Stream | tuple[Stream, ...] | None = None
        # Monotonic deadline after which the client is removed; None while it
        # has a live stream.
        self.expires_at: float | None = None
        # How many entries the streamer's expiry queue holds for it.
        self.armed = 0
        self._flags = 0  # _CLOSED, _SHARED

    @property
    def closed(self) -> bool:
        """Removed from its streamer: nothing more is done for it."""
        return bool(self._flags & _CLOSED)

    @closed.setter
    def closed(self, value: bool) -> None:
        self._flags = self._flags | _CLOSED if value else self._flags & ~_CLOSED

    @property
    def shared(self) -> bool:
        """In a cluster: its record is in the cluster store, which has the
        last word on its topics."""
        return bool(self._flags & _SHARED)

    @shared.setter
    def shared(self, value: bool) -> None:
        self._flags = self._flags | _SHARED if value else self._flags & ~_SHARED

    @property
    def streams(self) -> tuple[Stream, ...]:
        """Its live streams, oldest first."""
        held = self._streams
        if held is None:
            return ()
        if isinstance(held, tuple):
            return held
        return (held,)

    @property
    def topics(self) -> list[str]:
        return list(self._topics)

    def has_topic(self, topic: str) -> bool:
        return topic in self._topics

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    def new_topics(self, topics: Iterable[str]) -> list[str]:
        """``topics`` it does not hold yet, each once, in order."""
        held = self._topics
        return [t for t in dict.fromkeys(topics) if t not in held]

    # The streamer keeps topics, driver subscriptions and streams in step;
    # these are its only writers.
    def _add_topic(self, topic: str) -> None:
        self._add_topics((topic,))

    def _add_topics(self, topics: Iterable[str]) -> None:
        held = self._topics
        if isinstance(held, dict):
            held.update(dict.fromkeys(topics))
            return
        if held:
            more = tuple(t for t in dict.fromkeys(topics) if t not in held)
        else:  # a new client's topics at connect: no generator needed
            more = tuple(dict.fromkeys(topics))
        if len(held) + len(more) > SMALL_TOPICS:
            self._topics = dict.fromkeys(held + more)
        elif more:
            self._topics = held + more

    def _add_stream(self, stream: Stream) -> None:
        held = self._streams
        self._streams = stream if held is None else (*self.streams, stream)

    def _remove_stream(self, stream: Stream) -> bool:
        streams = self.streams
        if stream not in streams:
            return False
        rest = tuple(s for s in streams if s is not stream)
        self._streams = None if not rest else rest[0] if len(rest) == 1 else rest
        return True

    def _end_streams(self) -> tuple[Stream, ...]:
        streams, self._streams = self.streams, None
        return streams

    def _remove_topic(self, topic: str) -> bool:
        held = self._topics
        if isinstance(held, dict):
            return held.pop(topic, False) is None
        if topic not in held:
            return False
        self._topics = tuple(t for t in held if t != topic)
        return True

    def __repr__(self) -> str:
        return f"<Client {self.id[:6]}... topics={len(self._topics)} streams={len(self.streams)}>"
