"""gochan's compiled core: SSE frame encoding, the topic table and the fan-out,
and the fast paths' request parsers (publish, connect).

There is deliberately no silent fallback: if the extension is not built,
importing gochan fails with a message saying how to build it.
"""

try:
    from .core import (
        DEFAULT_MAX_FLUSH_DELAY,
        DEFAULT_MAX_PENDING,
        HEARTBEAT,
        LATENCY_BUCKETS_S,
        PUBLISH_DECLINED,
        PUBLISH_INCOMPLETE,
        STREAM_DURATION_BUCKETS_S,
        ConnectParser,
        Histogram,
        Hub,
        PublishParser,
        Subscriber,
        Topic,
        encode_event,
        encode_system,
    )
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "gochan's Cython core is not built; install with `pip install -e .` "
        f"(or `pip install .`) to compile it: {exc}"
    ) from exc

__all__ = [
    "DEFAULT_MAX_FLUSH_DELAY",
    "DEFAULT_MAX_PENDING",
    "HEARTBEAT",
    "LATENCY_BUCKETS_S",
    "PUBLISH_DECLINED",
    "PUBLISH_INCOMPLETE",
    "STREAM_DURATION_BUCKETS_S",
    "ConnectParser",
    "Histogram",
    "Hub",
    "PublishParser",
    "Subscriber",
    "Topic",
    "encode_event",
    "encode_system",
]
