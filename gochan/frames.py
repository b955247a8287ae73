"""The system frames gochan sends on its own account (``event: message``):
the first frame, replay results, subscription failures, the shutdown notice
and ``Client closed``.
Messages' frames are encoded by the Cython core (``_fast.encode_event``)."""

from __future__ import annotations

import orjson

from ._fast import encode_system

__all__ = [
    "CLIENT_CLOSED_FRAME",
    "TOKEN_EXPIRED_FRAME",
    "closing_frame",
    "first_frame",
    "replay_frame",
    "shutdown_frame",
    "subscription_failure_frame",
]

CLIENT_CLOSED_FRAME = encode_system(b"Client closed")
# A stream whose token expired ends with this, then Client closed.
TOKEN_EXPIRED_MESSAGE = "the token expired: reconnect with a new one"
TOKEN_EXPIRED_FRAME = encode_system(
    orjson.dumps({"error": {"code": "token-expired", "message": TOKEN_EXPIRED_MESSAGE}})
)
REPLAY_ID_CHARS = 256  # a Last-Event-ID echoed back is cut to this


def first_frame(client_id: str, client_ttl_s: float, topics: list[str]) -> bytes:
    """The client's config and subscriptions, first on every stream."""
    first = {
        "config": {"client_id": client_id, "client_ttl_millis": int(client_ttl_s * 1000)},
        "subscriptions": topics,
    }
    return encode_system(orjson.dumps(first))


def replay_frame(last_event_id: str, recovered: bool) -> bytes:
    replay = {"replay": {"last_event_id": last_event_id[:REPLAY_ID_CHARS], "recovered": recovered}}
    return encode_system(orjson.dumps(replay))


def subscription_failure_frame(topic: str, message: str) -> bytes:
    payload = {"error": {"code": "subscription-failure", "message": message, "topic": topic}}
    return encode_system(orjson.dumps(payload))


def shutdown_frame(retry_ms: int) -> bytes:
    """``{"shutdown":{"retry_ms":N}}``: the reconnection delay in a frame that
    JavaScript can read (an ``EventSource`` keeps ``retry:`` to itself)."""
    return encode_system(orjson.dumps({"shutdown": {"retry_ms": retry_ms}}))


def closing_frame(retry_ms: int) -> bytes:
    """How a stream ends at shutdown: the :func:`shutdown_frame`, then
    ``Client closed`` carrying a ``retry:`` field with the same delay. The
    ``Client closed`` frame is the one old clients know, byte for byte; the
    ``retry:`` is in it, so the reconnection delay is set by the same event
    that ends the stream."""
    return shutdown_frame(retry_ms) + b"retry: %d\n" % retry_ms + CLIENT_CLOSED_FRAME
