"""The Kafka driver (aiokafka).

Each gochan process is its own consumer: no consumer group, no committed
offsets, manual partition assignment, so every process that holds a topic
receives every message of it (fan-out, never competing consumers). Nothing
is created on the broker (topics are auto-created by the broker when its
``auto.create.topics.enable`` allows it), so ``close`` only disconnects.
Two modes:

**Per topic** (the default). The Kafka topic is ``prefix + topic``,
unchanged. ``subscribe(topic)`` adds every partition of it to the process's
assignment, positioned at the end offsets read at that moment, so every
message produced after ``subscribe`` returns is delivered; ``unsubscribe``
removes them again. gochan topics that Kafka cannot name (characters other
than ``[A-Za-z0-9._-]``, longer than 249 characters with the prefix,
``.``/``..``, or starting with ``__``, which Kafka reserves) are refused by
:meth:`check_topic`; no escaping, so plain Kafka producers and gochan use the
same names. Records are written without a key (the producer spreads them over
the partitions: use one-partition topics where order matters). The driver
passes ``"<partition>:<offset>"`` along, but a stream holds several topics of
several partitions and Kafka orders records per partition only, so one
Last-Event-ID cannot name where a browser stands in all of them: gochan
numbers these messages itself and replays them from its memory, on the node
that relayed them (``recovered:false`` on another node or after a restart).

**Durable** (``log_topic``). Every gochan topic is written to ONE Kafka topic
of exactly one partition, the log, with ``prefix + topic`` as the record key
(a plain producer writes there with that key; records without one, or of
topics nobody holds here, are dropped and counted as ``stray``). One
partition is one order for every message, so an event id is one position,
``"<tag>:<offset>"``: ``tag`` is 8 hex digits hashed from the cluster id and
the log's name, so ids mean the same on every node of the cluster and after a
restart, and an id of another cluster or log is recognised as not ours. The
process's live consumer reads the log from its end while it holds a topic.
A Last-Event-ID ``<tag>:<k>`` is replayed by a consumer of its own (at most
``REPLAY_CONCURRENCY`` at once) seeking to ``k + 1``, up to the offset the
live consumer has delivered to (waiting, within ``timeout``, until it has
passed ``k`` when the browser comes from a node that was ahead): what was
delivered live meanwhile is held by :mod:`gochan.replay` and sent after it,
less what the replay covered, so nothing is lost or sent twice. An offset
beyond the log's end, one the log no longer keeps (retention), another
cluster's or garbage gets ``recovered:false``. Connecting refuses a log with
more than one partition.

The costs of durable mode: one partition is the throughput of one partition
leader, and every node reads the records of every topic (filtering the ones
it does not hold); the log must use ``cleanup.policy=delete`` (compaction
keeps one record per key, here per topic); a log deleted and created again
under the same name restarts its offsets, and ids from before then point at
the wrong records (until they pass the new end, which is refused). The
alternatives were weighed and not taken: a topic per Kafka partition (keyed)
keeps the per-partition order only, and one Last-Event-ID of one topic does
not say where the browser stood in the others; timestamps
(``offsets_for_times``) do not order records across partitions exactly; a
vector of offsets in every id grows with the partitions and is not the same
id on every node.

Bodies are relayed as the record value, byte for byte (a null value, a
tombstone, becomes an empty body); headers are ignored. A ``publish`` that
fails with a timeout has an unknown outcome: the producer may still write the
record afterwards.

Outages: aiokafka reconnects by itself; a health probe (a metadata request
every ``health_interval`` seconds) notices a lost broker, and the shared
reconnection loop probes it with backoff (``reconnect_min`` ..
``reconnect_max``) until it answers, then counts a reconnect. The
assignment and the positions survive the outage, so no message retained
by the broker is lost; after a reconnect a topic that no longer exists (in
durable mode, the log) is reported with ``on_subscription_failure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Awaitable, Sequence
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
    ReplayGapError,
)
from ..log import broker_logger
from ..waiting import within
from ._common import bounded, cancel_and_wait, require_positive
from ._kafka_log import cluster_id, log_tag, read_log, record_topic
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
REPLAY_CONCURRENCY = 8  # replays reading the log at once (one consumer each)

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
    ``log_topic`` (str)
        Durable mode: every gochan topic is written to this ONE Kafka topic,
        which must have exactly one partition, with the gochan topic (after
        ``prefix``) as the record key; event ids are its offsets and
        Last-Event-ID replay reads it back on any node. Default ``""``: one
        Kafka topic per gochan topic, replay from gochan's memory.
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
        log_topic: str = "",
    ) -> None:
        if not bootstrap_servers.strip():
            raise ConfigurationError("kafka: bootstrap_servers is empty")
        if _KAFKA_NAME_RE.fullmatch(prefix) is None:
            raise ConfigurationError(
                f"kafka: prefix {prefix!r} may only contain A-Z, a-z, 0-9, '.', '_', '-'"
            )
        if log_topic and (
            _KAFKA_NAME_RE.fullmatch(log_topic) is None
            or len(log_topic) > KAFKA_TOPIC_MAX_CHARS
            or log_topic in (".", "..")
        ):
            raise ConfigurationError(f"kafka: log_topic {log_topic!r} is not a Kafka topic name")
        require_positive("kafka", timeout=timeout, health_interval=health_interval)
        self.bootstrap_servers = bootstrap_servers
        self.prefix = prefix
        self.client_id = client_id
        self.timeout = float(timeout)
        self.health_interval = float(health_interval)
        self.log_topic = log_topic

        super().__init__(reconnect_min, reconnect_max)
        self._producer: Any = None
        self._consumer: Any = None
        self._topics: dict[str, str] = {}  # gochan topic -> Kafka topic
        self._by_ktopic: dict[str, str] = {}  # Kafka topic -> gochan topic
        self._assign_lock = asyncio.Lock()
        self._has_topics = asyncio.Event()
        self._consume_task: asyncio.Task[None] | None = None
        # Durable mode: the id tag (cluster and log), the next offset of the
        # log the live consumer has not delivered yet, and a wake-up for
        # replays waiting for it to advance.
        self._tag = ""
        self._delivered = 0
        self._progress = asyncio.Event()
        self._replays = asyncio.Semaphore(REPLAY_CONCURRENCY)

    def _where(self) -> str:
        return f"Kafka at {self.bootstrap_servers}"

    def kafka_topic(self, topic: str) -> str:
        """The Kafka topic name for ``topic`` (after :meth:`check_topic`)."""
        return self.log_topic or self.prefix + topic

    def check_topic(self, topic: str) -> None:
        if not topic:
            raise InvalidTopicError(topic, "empty")
        if self.log_topic:
            return  # a record key: any topic gochan accepts
        ktopic = self.kafka_topic(topic)
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
        if self.log_topic:
            await self._check_log()
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
            if self.log_topic:
                if not self._topics:
                    await self._assign_log()
                self._topics[topic] = ktopic
                self._has_topics.set()
                broker_logger.debug("kafka: subscribed %r (in %r)", topic, ktopic)
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
            if self.log_topic:
                if not self._topics:  # the next subscribe starts at the end
                    self._consumer.assign([])
                    self._has_topics.clear()
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
        if self.log_topic:
            send = self._producer.send_and_wait(
                ktopic, bytes(data), key=(self.prefix + topic).encode(), partition=0
            )
        else:
            send = self._producer.send_and_wait(ktopic, bytes(data))
        try:
            meta = await self._bounded(send)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"kafka: cannot publish to {ktopic!r}: {exc!r}") from exc
        self._published += 1
        if self.log_topic:
            return f"{self._tag}:{int(meta.offset)}"
        return _event_id(int(meta.partition), int(meta.offset))

    # -- replay (DurableDriver) ----------------------------------------------

    @property
    def durable(self) -> bool:
        """True with ``log_topic``: event ids are offsets of the one log."""
        return bool(self.log_topic)

    def event_position(self, event_id: str) -> int | None:
        tag, sep, offset = event_id.partition(":")
        if not (self._tag and sep and tag == self._tag and offset.isascii() and offset.isdigit()):
            return None  # not durable, another cluster's or log's id, garbage
        return int(offset)

    async def replay(
        self, topics: Sequence[str], after: int
    ) -> AsyncGenerator[tuple[str, bytes, str], None]:
        """The log's records on ``topics`` after offset ``after``, through the
        last one the live consumer had delivered (what comes later is
        delivered live), read by a consumer of its own."""
        if not self.log_topic:
            raise ReplayGapError("Kafka without log_topic has no single order to replay")
        self._check_ready()
        wanted = set(topics)
        prefix, tag = self.prefix, self._tag
        async with self._replays:
            records = read_log(
                self.bootstrap_servers,
                self.client_id,
                self.timeout,
                self.log_topic,
                after,
                self._caught_up if self._topics else None,
            )
            async with contextlib.aclosing(records):
                async for record in records:
                    topic = record_topic(record.key, prefix)
                    if topic in wanted:
                        assert topic is not None
                        value = record.value
                        data = b"" if value is None else bytes(value)
                        yield topic, data, f"{tag}:{int(record.offset)}"

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
                if self.log_topic:
                    self._deliver_log(records)
                    continue
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
                    self._by_ktopic.pop(ktopic, None)
            if lost:
                kept = set(self._topics.values())
                try:
                    positions = await self._bounded(self._positions())
                    self._assign({tp: o for tp, o in positions.items() if tp.topic in kept})
                except (KafkaError, TimeoutError) as exc:
                    broker_logger.warning("kafka: reassignment after reconnect: %r", exc)
                if not self._topics:
                    self._has_topics.clear()
        for topic in lost:
            self._report_failure(topic, "the Kafka topic no longer exists after a reconnect")

    # -- durable mode ------------------------------------------------------------

    async def _check_log(self) -> None:
        """The log exists with exactly one partition; the id tag."""
        try:
            partitions = await self._bounded(self._producer.partitions_for(self.log_topic))
            cluster = await cluster_id(self.bootstrap_servers, self.client_id, self.timeout)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise BrokerConnectionError(
                f"kafka: cannot read log_topic {self.log_topic!r}: {exc!r}"
            ) from exc
        if set(partitions or ()) != {0}:
            raise BrokerError(
                f"kafka: log_topic {self.log_topic!r} has {len(partitions or ())} partitions;"
                " replay needs exactly one (one order for every message)"
            )
        self._tag = log_tag(cluster, self.log_topic)

    async def _assign_log(self) -> None:
        """The first topic: the live consumer reads the log from its end."""
        tp = TopicPartition(self.log_topic, 0)
        try:
            ends = await self._bounded(self._consumer.end_offsets([tp]))
        except (KafkaError, TimeoutError) as exc:
            raise BrokerError(f"kafka: cannot read {self.log_topic!r}: {exc!r}") from exc
        self._consumer.assign([tp])
        self._consumer.seek(tp, int(ends[tp]))
        self._delivered = int(ends[tp])

    def _deliver_log(self, records: Any) -> None:
        prefix, tag = self.prefix, self._tag
        for record in records:
            value = record.value
            self._deliver(
                record_topic(record.key, prefix),
                b"" if value is None else bytes(value),
                f"{tag}:{record.offset}",
            )
            self._delivered = int(record.offset) + 1
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def _caught_up(self, after: int) -> int:
        """Wait until the live consumer has delivered offset ``after`` (a
        browser may come from a node that is ahead of this one); the next
        offset it will deliver, where the replay stops."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while self._delivered <= after:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BrokerError(f"kafka: live delivery did not reach offset {after} in time")
            with contextlib.suppress(TimeoutError):
                await within(self._progress.wait(), remaining)
        return self._delivered

    @staticmethod
    async def _stop_quietly(*clients: Any) -> None:
        for client in clients:
            if client is None:
                continue
            try:
                await within(client.stop(), STOP_TIMEOUT_S)
            except Exception as exc:
                broker_logger.debug("kafka: stop: %r", exc)
