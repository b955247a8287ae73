"""The Kafka driver (aiokafka).

Each gochan process is its own consumer: no consumer group, no committed
offsets, manual partition assignment. ``subscribe(topic)`` adds every
partition of the Kafka topic to the process's assignment, positioned at the
end offsets read at that moment, so every message produced after
``subscribe`` returns is delivered to every process that holds the topic
(fan-out, never competing consumers). ``unsubscribe`` removes them again.
Nothing is created on the broker (topics are auto-created by the broker when
its ``auto.create.topics.enable`` allows it), so ``close`` only disconnects.

Topic mapping: the Kafka topic is ``prefix + topic``, unchanged. gochan topics
that Kafka cannot name (characters other than ``[A-Za-z0-9._-]``, longer than
249 characters with the prefix, ``.``/``..``, or starting with ``__``, which
Kafka reserves for internal topics) are refused by :meth:`check_topic`; no
escaping, so that plain Kafka producers and gochan use the same names.

Event ids are ``"<partition>:<offset>"`` (decimal), the record's position in
the Kafka topic; ``publish`` returns the id of the record it wrote.

Bodies are relayed as the record value, byte for byte (a null value, a
tombstone, becomes an empty body); keys and headers are ignored, and
``publish`` writes records without a key (the producer spreads them over the
partitions: use one-partition topics where the order of messages matters).
A ``publish`` that fails with a timeout has an unknown outcome: the producer
may still write the record afterwards.

Outages: aiokafka reconnects by itself; a health probe (a metadata request
every ``health_interval`` seconds) notices a lost broker, and the shared
reconnection loop probes it with backoff (``reconnect_min`` ..
``reconnect_max``) until it answers, then counts a reconnect. The
assignment and the positions survive the outage, so no message retained
by the broker is lost; after a reconnect a topic that no longer exists is
reported with ``on_subscription_failure``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

from aiokafka import (  # type: ignore[import-untyped]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.errors import KafkaError  # type: ignore[import-untyped]

from ..errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)
from ..log import broker_logger
from ._common import bounded, cancel_and_wait, require_positive
from ._lifecycle import Lifecycle

__all__ = ["KafkaDriver"]

DEFAULT_BOOTSTRAP_SERVERS = "127.0.0.1:9092"
DEFAULT_PREFIX = ""
DEFAULT_CLIENT_ID = "gochan"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_HEALTH_INTERVAL_S = 2.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 2.0
POLL_TIMEOUT_MS = 1000  # one getmany() wait; bounds how long close() waits for it
CONSUME_ERROR_BACKOFF_S = 0.5
STOP_TIMEOUT_S = 5.0

KAFKA_TOPIC_MAX_CHARS = 249
_KAFKA_NAME_RE = re.compile(r"[A-Za-z0-9._-]*")

_T = TypeVar("_T")


def _event_id(partition: int, offset: int) -> str:
    return f"{partition}:{offset}"


class KafkaDriver(Lifecycle[None]):
    """Relay Kafka topics.

    Keyword arguments (all optional):

    ``bootstrap_servers`` (str)
        Comma-separated ``host:port`` list. Default ``127.0.0.1:9092``.
    ``prefix`` (str)
        Prepended to every gochan topic to form the Kafka topic name
        (``[A-Za-z0-9._-]``). Default ``""``.
    ``client_id`` (str)
        The Kafka client id (seen in broker logs and quotas). Default ``gochan``.
    ``timeout`` (float, seconds)
        Bound on connect, subscribe and publish, so that a missing broker is
        an error rather than a hang. Default 10.
    ``health_interval`` (float, seconds)
        How often the connection is probed while it is up. Default 2.
    ``reconnect_min``, ``reconnect_max`` (float, seconds)
        Backoff bounds between probes while the broker is away. Default 0.1, 2.
    """

    name: ClassVar[str] = "kafka"
    broker: ClassVar[str] = "Kafka"

    def __init__(
        self,
        bootstrap_servers: str = DEFAULT_BOOTSTRAP_SERVERS,
        prefix: str = DEFAULT_PREFIX,
        client_id: str = DEFAULT_CLIENT_ID,
        timeout: float = DEFAULT_TIMEOUT_S,
        health_interval: float = DEFAULT_HEALTH_INTERVAL_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if not bootstrap_servers.strip():
            raise ConfigurationError("kafka: bootstrap_servers is empty")
        if _KAFKA_NAME_RE.fullmatch(prefix) is None:
            raise ConfigurationError(
                f"kafka: prefix {prefix!r} may only contain A-Z, a-z, 0-9, '.', '_', '-'"
            )
        require_positive("kafka", timeout=timeout, health_interval=health_interval)
        self.bootstrap_servers = bootstrap_servers
        self.prefix = prefix
        self.client_id = client_id
        self.timeout = float(timeout)
        self.health_interval = float(health_interval)

        super().__init__(reconnect_min, reconnect_max)
        self._producer: Any = None
        self._consumer: Any = None
        self._topics: dict[str, str] = {}  # gochan topic -> Kafka topic
        self._by_ktopic: dict[str, str] = {}  # Kafka topic -> gochan topic
        self._assign_lock = asyncio.Lock()
        self._has_topics = asyncio.Event()
        self._consume_task: asyncio.Task[None] | None = None

    def _where(self) -> str:
        return f"Kafka at {self.bootstrap_servers}"

    def kafka_topic(self, topic: str) -> str:
        """The Kafka topic name for ``topic`` (after :meth:`check_topic`)."""
        return self.prefix + topic

    def check_topic(self, topic: str) -> None:
        ktopic = self.kafka_topic(topic)
        if not topic:
            raise InvalidTopicError(topic, "empty")
        if _KAFKA_NAME_RE.fullmatch(topic) is None:
            raise InvalidTopicError(
                topic, "Kafka topic names may only contain A-Z, a-z, 0-9, '.', '_' and '-'"
            )
        if len(ktopic) > KAFKA_TOPIC_MAX_CHARS:
            raise InvalidTopicError(
                topic, f"Kafka topic names are at most {KAFKA_TOPIC_MAX_CHARS} characters"
            )
        if ktopic in (".", ".."):
            raise InvalidTopicError(topic, "'.' and '..' are not Kafka topic names")
        if ktopic.startswith("__"):
            raise InvalidTopicError(topic, "Kafka reserves names starting with '__'")

    async def _start(self) -> None:
        timeout_ms = int(self.timeout * 1000)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            request_timeout_ms=timeout_ms,
        )
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            group_id=None,  # never a group: every process gets every message
            enable_auto_commit=False,
            auto_offset_reset="latest",
            request_timeout_ms=timeout_ms,
        )
        try:
            await self._bounded(self._producer.start())
            await self._bounded(self._consumer.start())
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerConnectionError(f"cannot connect to {self._where()}: {exc!r}") from exc
        self._consume_task = asyncio.create_task(self._consume_loop(), name="gochan-kafka-consume")

    async def _stop(self) -> None:
        task, self._consume_task = self._consume_task, None
        await cancel_and_wait(task)
        await self._stop_quietly(self._consumer, self._producer)
        self._consumer = self._producer = None
        self._topics.clear()
        self._by_ktopic.clear()

    async def _open(self) -> None:
        """aiokafka keeps the connection: only see that the broker answers."""
        if not await self._probe():
            raise BrokerConnectionError(f"no answer from {self._where()}")

    async def _restore(self, conn: None) -> bool:
        await self._check_topics()
        return True

    async def _serve(self, conn: None) -> str:
        while True:
            await asyncio.sleep(self.health_interval)
            if not await self._probe():
                return "lost the connection"

    async def _discard(self, conn: None) -> None:
        pass  # aiokafka reconnects by itself

    async def _close(self) -> None:
        pass  # all in _stop

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        self._check_ready()
        ktopic = self.kafka_topic(topic)
        async with self._assign_lock:
            if topic in self._topics:
                return
            try:
                partitions = await self._bounded(self._producer.partitions_for(ktopic))
                new = [TopicPartition(ktopic, p) for p in sorted(partitions)]
                ends: dict[Any, int] = await self._bounded(self._consumer.end_offsets(new))
                positions = await self._bounded(self._positions())
            except (KafkaError, TimeoutError) as exc:
                raise BrokerError(f"kafka: cannot subscribe to {ktopic!r}: {exc!r}") from exc
            # No await from here on: the consume task cannot run in between,
            # so the new assignment starts exactly at the offsets read above.
            positions.update(ends)
            self._assign(positions)
            self._topics[topic] = ktopic
            self._by_ktopic[ktopic] = topic
            self._has_topics.set()
        broker_logger.debug("kafka: subscribed %r (%d partitions)", ktopic, len(new))

    async def unsubscribe(self, topic: str) -> None:
        async with self._assign_lock:
            ktopic = self._topics.pop(topic, None)
            if ktopic is None or self._consumer is None:
                return
            del self._by_ktopic[ktopic]
            try:
                positions = await self._bounded(self._positions(exclude=ktopic))
            except (KafkaError, TimeoutError) as exc:
                # Keep delivering the other topics; this one is filtered out
                # by the mapping already and is dropped at the next change.
                broker_logger.warning("kafka: unsubscribe %r: %r", ktopic, exc)
                return
            self._assign(positions)
            if not self._topics:
                self._has_topics.clear()
        broker_logger.debug("kafka: unsubscribed %r", ktopic)

    async def publish(self, topic: str, data: bytes) -> str:
        self.check_topic(topic)
        self._check_ready()
        ktopic = self.kafka_topic(topic)
        try:
            meta = await self._bounded(self._producer.send_and_wait(ktopic, bytes(data)))
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"kafka: cannot publish to {ktopic!r}: {exc!r}") from exc
        self._published += 1
        return _event_id(int(meta.partition), int(meta.offset))

    # -- internals -----------------------------------------------------------

    async def _bounded(self, aw: Awaitable[_T]) -> _T:
        return await bounded(aw, self.timeout, "Kafka")

    async def _positions(self, exclude: str | None = None) -> dict[Any, int]:
        """The next offset of every assigned partition (except ``exclude``'s)."""
        positions: dict[Any, int] = {}
        for tp in self._consumer.assignment():
            if tp.topic != exclude:
                positions[tp] = int(await self._consumer.position(tp))
        return positions

    def _assign(self, positions: dict[Any, int]) -> None:
        # assign() replaces the whole assignment and forgets positions, so
        # every partition is put back where it was.
        self._consumer.assign(list(positions))
        for tp, offset in positions.items():
            self._consumer.seek(tp, offset)

    async def _consume_loop(self) -> None:
        while True:
            await self._has_topics.wait()
            try:
                batches = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            except Exception as exc:  # never let the loop die: log, pause, go on
                broker_logger.warning("kafka: fetch failed: %r", exc)
                await asyncio.sleep(CONSUME_ERROR_BACKOFF_S)
                continue
            for tp, records in batches.items():
                topic = self._by_ktopic.get(tp.topic)
                for record in records:
                    value = record.value
                    self._deliver(
                        topic,
                        b"" if value is None else bytes(value),
                        _event_id(int(record.partition), int(record.offset)),
                    )

    async def _probe(self) -> bool:
        try:
            return bool(await self._bounded(self._producer.client.force_metadata_update()))
        except (KafkaError, OSError, TimeoutError):
            return False

    async def _check_topics(self) -> None:
        """After a reconnect: drop topics the broker no longer has."""
        cluster = self._producer.client.cluster
        lost: list[str] = []
        async with self._assign_lock:
            for topic, ktopic in list(self._topics.items()):
                if cluster.partitions_for_topic(ktopic) is None:
                    lost.append(topic)
                    del self._topics[topic]
                    del self._by_ktopic[ktopic]
            if lost:
                try:
                    positions = await self._bounded(self._positions())
                    self._assign(
                        {tp: o for tp, o in positions.items() if tp.topic in self._by_ktopic}
                    )
                except (KafkaError, TimeoutError) as exc:
                    broker_logger.warning("kafka: reassignment after reconnect: %r", exc)
                if not self._topics:
                    self._has_topics.clear()
        for topic in lost:
            self._report_failure(topic, "the Kafka topic no longer exists after a reconnect")

    @staticmethod
    async def _stop_quietly(*clients: Any) -> None:
        for client in clients:
            if client is None:
                continue
            try:
                await asyncio.wait_for(client.stop(), STOP_TIMEOUT_S)
            except Exception as exc:
                broker_logger.debug("kafka: stop: %r", exc)
