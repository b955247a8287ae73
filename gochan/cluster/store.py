"""The ClusterStore protocol: where a cluster keeps its clients' records and
how its nodes reach each other.

A store is two things on one server: versioned keys (compare-and-set on a
revision, an expiry) and pub/sub channels (one inbox per node, one channel
every node hears). Both come from the broker's own machinery (JetStream
key-value and core NATS subjects, or Redis keys and Redis pub/sub); gochan
adds no consensus of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["ALL_NODES", "ClusterStore", "Entry", "OnMessage", "key_of", "valid_node_id"]

ALL_NODES = "*"  # send()'s address for every node
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]+")
_NODE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

OnMessage = Callable[[bytes], None]


class Entry(NamedTuple):
    """A key's value and the revision that wrote it."""

    value: bytes
    revision: int


def valid_node_id(node_id: str) -> bool:
    """Node ids name subjects and channels: 1..64 of A-Z a-z 0-9 _ -."""
    return bool(_NODE_ID.fullmatch(node_id))


def key_of(client_id: str) -> str:
    """The store key of a client id, in characters every store accepts (a
    JetStream key allows neither ``~`` nor a trailing ``.``): ids of
    A-Z a-z 0-9 _ - as they are, others hex-encoded, under another prefix
    so the two never meet."""
    if _SAFE_ID.fullmatch(client_id):
        return "c." + client_id
    return "h." + client_id.encode().hex()


@runtime_checkable
class ClusterStore(Protocol):
    """Versioned keys with an expiry, and a channel per node."""

    @property
    def url(self) -> str:
        """The server, credentials redacted (for /readyz and logs)."""

    @property
    def ready(self) -> bool:
        """True while the store's server is reachable."""

    async def connect(self, node_id: str, on_message: OnMessage, record_ttl: float) -> None:
        """Connect; from now on ``on_message`` gets what is sent to
        ``node_id`` or to every node. ``record_ttl``: how long a key lives
        once nobody touches it (a store may fix it when it creates its
        bucket)."""

    async def close(self) -> None:
        """Disconnect; idempotent."""

    async def get(self, key: str) -> Entry | None:
        """The key's entry, None when it is missing (or expired)."""

    async def create(self, key: str, value: bytes) -> int | None:
        """Write a new key; its revision, None if the key exists."""

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        """Write ``key`` if its revision is still ``revision``; the new one,
        or None when it has changed or is gone (read it again)."""

    async def delete(self, key: str, revision: int) -> bool:
        """Delete ``key`` if its revision is still ``revision``."""

    async def touch(self, keys: list[str]) -> None:
        """Restart the expiry of ``keys`` (the records this node holds)."""

    async def send(self, node_id: str, payload: bytes) -> None:
        """Send ``payload`` to ``node_id``'s inbox, or to every node with
        :data:`ALL_NODES`."""
