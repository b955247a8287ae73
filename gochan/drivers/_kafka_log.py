"""The Kafka driver's durable mode (``log_topic``): the event id tag, the
cluster id, and replay reads of the one log by a consumer of their own.
See :mod:`gochan.drivers.kafka` for the design."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped]
from aiokafka.errors import (  # type: ignore[import-untyped]
    KafkaError,
    OffsetOutOfRangeError,
)

from ..errors import BrokerError, ReplayGapError
from ..log import broker_logger
from ..waiting import within
from ._common import bounded

__all__ = ["cluster_id", "log_bounds", "log_tag", "read_log", "record_topic"]

REPLAY_FETCH_MS = 500  # one getmany() wait while a replay reads the log
STOP_TIMEOUT_S = 5.0


def log_tag(cluster: str, log_topic: str) -> str:
    """The first part of a durable event id (``<tag>:<offset>``): 8 hex
    digits naming the cluster and the log, the same on every node and after
    a restart, so an id from another cluster or another log is not ours."""
    return hashlib.blake2b(f"{cluster}/{log_topic}".encode(), digest_size=4).hexdigest()


def record_topic(key: Any, prefix: str) -> str | None:
    """The gochan topic a log record's key names, or None (no key, not
    UTF-8, not under ``prefix``)."""
    if key is None:
        return None
    try:
        name = bytes(key).decode()
    except UnicodeDecodeError:
        return None
    if not name.startswith(prefix) or len(name) == len(prefix):
        return None
    return name[len(prefix) :]


async def cluster_id(bootstrap_servers: str, client_id: str, timeout_s: float) -> str:
    """The cluster's id (``""`` from brokers too old to say)."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        await bounded(admin.start(), timeout_s, "Kafka")
        info = await bounded(admin.describe_cluster(), timeout_s, "Kafka")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return str(info.get("cluster_id") or "")


async def log_bounds(consumer: Any, tp: Any, timeout_s: float) -> tuple[int, int]:
    """The log's first kept offset and its end (the next offset written)."""
    first = await bounded(consumer.beginning_offsets([tp]), timeout_s, "Kafka")
    end = await bounded(consumer.end_offsets([tp]), timeout_s, "Kafka")
    return int(first[tp]), int(end[tp])


async def read_log(
    bootstrap_servers: str,
    client_id: str,
    timeout_s: float,
    log_topic: str,
    after: int,
    caught_up: Callable[[int], Awaitable[int]] | None,
) -> AsyncGenerator[Any, None]:
    """The records of the log after offset ``after``: through the log's end
    at the call, or, with ``caught_up`` (which waits until live delivery has
    passed ``after`` and returns the next offset it will deliver), up to that
    offset. ReplayGapError before anything when ``after`` is beyond the end
    or older than what the log keeps; BrokerError on failure."""
    tp = TopicPartition(log_topic, 0)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",  # a log truncated meanwhile is an error, not a jump
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        try:
            await bounded(consumer.start(), timeout_s, "Kafka")
            first, end = await log_bounds(consumer, tp, timeout_s)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerError(f"kafka: cannot replay {log_topic!r}: {exc!r}") from exc
        start = after + 1
        if start > end:
            raise ReplayGapError(f"offset {after} is beyond {log_topic!r}'s end ({end})")
        if start < first:
            raise ReplayGapError(f"{log_topic!r} no longer keeps offset {start}")
        upto = end if caught_up is None else await caught_up(after)
        if start >= upto:
            return
        consumer.assign([tp])
        consumer.seek(tp, start)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                batches = await bounded(
                    consumer.getmany(tp, timeout_ms=REPLAY_FETCH_MS), timeout_s, "Kafka"
                )
                records = batches.get(tp, ())
                for record in records:
                    if record.offset >= upto:
                        return
                    yield record
                if await consumer.position(tp) >= upto:  # offsets without records
                    return
            except OffsetOutOfRangeError as exc:
                raise ReplayGapError(f"{log_topic!r} was truncated during the replay") from exc
            except (KafkaError, TimeoutError) as exc:
                raise BrokerError(f"kafka: replay of {log_topic!r} failed: {exc!r}") from exc
            if records:
                deadline = loop.time() + timeout_s
            elif loop.time() > deadline:
                raise BrokerError(f"kafka: replay of {log_topic!r} stalled")
    finally:
        try:
            await within(consumer.stop(), STOP_TIMEOUT_S)
        except Exception as exc:
            broker_logger.debug("kafka: stop replay consumer: %r", exc)
