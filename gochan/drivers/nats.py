"""The NATS driver: core NATS pub/sub by default, JetStream for durable topics.

Topic to subject mapping
------------------------
A topic is used as the NATS subject as it is, after an optional ``prefix``::

    subject = prefix + topic        # prefix "" (default) or e.g. "gochan."

so ``nats pub orders.eu ...`` reaches the gochan topic ``orders.eu`` (with
``prefix="gochan."``: ``nats pub gochan.orders.eu ...``). ``.`` is NATS's
token separator and is allowed inside topics as a hierarchy separator, but
every token must be non-empty (no leading, trailing or doubled ``.``).
Topics are refused by :meth:`NatsDriver.check_topic` when they contain
whitespace of any kind, control characters, or the wildcard characters ``*``
and ``>`` (anywhere, not only as whole tokens: a browser subscribes to exact
topics, never to patterns). Without a prefix, topics starting with ``$`` are
refused too: ``$SYS``, ``$JS``, ``$KV`` ... are the server's own subjects.
Any other UTF-8 is passed through; subjects are case-sensitive.

Delivery
--------
The driver holds one NATS connection and ONE plain subscription (never a
queue group) per topic, so every gochan process receives every message. The
message body is relayed byte for byte; headers are ignored.

With ``jetstream=True`` the driver publishes through JetStream (the stream
sequence is returned as the event id) and subscribes with an ordered,
ephemeral push consumer per topic that starts after the stream's last
message at subscription time (only new messages). The last stream sequence
seen per topic is remembered, so after a reconnect the consumer resumes right
after it: messages stored while the connection was down are delivered, none
twice. The event id passed to ``Receiver.on_message`` is the stream sequence
(a decimal string, unique across the stream's topics).

Replay
------
With JetStream the driver is a :class:`~gochan.drivers.base.DurableDriver`:
a browser's Last-Event-ID (a stream sequence) is resumed from the stream on
any gochan process using it, and after restarts. A temporary pull consumer
reads the stream from the next sequence up to its last message at that
moment (the live consumers cover what follows; the streamer joins the two by
sequence). The replay is refused as incomplete when the id is beyond the
stream's last sequence or older than its first. Limits that drop single
topics' messages (``stream_max_msgs_per_subject``) can open a hole this check
does not see; size them for the reconnect window you want to cover.

Reconnects
----------
The driver reconnects by itself (the client library's own reconnect is
disabled so that there is one code path): exponential backoff with jitter
between ``reconnect_min`` and ``reconnect_max``, then every held topic
is subscribed again. ``ready`` is False meanwhile, ``subscribe`` and
``publish`` raise :class:`~gochan.errors.BrokerConnectionError` at once, and
``Receiver.on_subscription_failure`` is called only for topics the server
refused to restore (a permissions violation, a JetStream API error).

A connection is also given up, and replaced the same way, when a round trip
(the PING/PONG after a publish or a SUB, and one every ``ping_interval`` from
a watchdog) is not answered within ``request_timeout``: a server that is
frozen or unreachable without closing the socket, which nats-py alone would
keep "connected" for several ping intervals. Attempts start
``reconnect_min``..``reconnect_max`` apart counted from the start of the
previous one, so the attempt that is waiting when a frozen server resumes
gets through at once (the reconnection loop all drivers share,
:mod:`gochan.drivers._lifecycle`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

from ..errors import (
    BatchPublishError,
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    GochanError,
    InvalidTopicError,
    ReplayGapError,
)
from ..log import broker_logger
from ..topicset import TopicSet
from ..waiting import within
from ._common import redact_url, reject_renamed, require_positive
from ._lifecycle import Lifecycle
from ._nats_client import (
    CONNECTION_ERRORS,
    PERMISSION_RE,
    DirectClient,
    DirectSubscription,
    ensure_stream,
    flush,
    replay_stream,
    stop_consumer_tasks,
    stream_last_seq,
    subject_problem,
)

__all__ = ["NatsDriver"]


# What a publish may raise from nats-py: the connection's errors and its own.
PUBLISH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, nats.errors.Error)

# Round trips under way at once per connection (NatsDriver._round_trip). One
# would idle the connection between a PONG and the next PING: confirmed
# publishes, 16 in flight on each of 4 connections, cost 105 us of CPU each
# with one and 79 with two (bench/batch.py --driver nats); with no limit
# connects no longer share them (1.6 s for 10,000 instead of 1.0).
ROUND_TRIPS_IN_FLIGHT = 2

# A topic's broker subscription: a core one has only its sid (DirectClient).
Sub = Subscription | DirectSubscription


def _publish_error(exc: BaseException, subject: str, data: bytes) -> GochanError:
    """What a failed publish of ``data`` on ``subject`` is, in gochan's terms."""
    if isinstance(exc, GochanError):
        return exc
    if isinstance(exc, nats.errors.MaxPayloadError):
        return BrokerError(f"message of {len(data)} bytes exceeds the NATS server's max_payload")
    if isinstance(exc, CONNECTION_ERRORS):
        return BrokerConnectionError(f"publish to NATS failed: {exc!r}")
    return BrokerError(f"publish to NATS subject {subject!r} failed: {exc}")


DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = ""
DEFAULT_STREAM = "GOCHAN"
DEFAULT_STREAM_MAX_AGE_S = 3600.0
DEFAULT_STREAM_MAX_MSGS_PER_SUBJECT = 1000
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_REQUEST_TIMEOUT_S = 5.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 5.0
DEFAULT_PING_INTERVAL_S = 20.0
DEFAULT_MAX_OUTSTANDING_PINGS = 2
DEFAULT_IDLE_HEARTBEAT_S = 5.0
DEFAULT_CLIENT_NAME = "gochan"


class NatsDriver(Lifecycle[DirectClient]):
    """Relay NATS subjects (core pub/sub, or JetStream) to gochan topics.

    Keyword arguments (all optional; the config layer exposes each one as
    ``--nats-<name>`` and ``GOCHAN_NATS_<NAME>``):

    url
        NATS server URL, ``nats://[user:password@]host:port``; several
        servers of a cluster may be given separated by commas.
    prefix
        Prepended to every topic to make its subject; ``""`` or a valid
        subject ending with ``.`` (``"gochan."``). Required with JetStream.
    jetstream
        Publish and subscribe through JetStream (durable, with stream
        sequences as event ids) instead of core NATS.
    stream
        JetStream stream name.
    create_stream
        Create ``stream`` if missing, with subjects ``<prefix>>``, file
        storage and the two limits below. An existing stream is used as is.
    stream_max_age
        Seconds a message is kept in a stream created by the driver.
    stream_max_msgs_per_subject
        Messages kept per topic in a stream created by the driver (-1: no limit).
    connect_timeout
        Seconds allowed for one connection attempt (TCP, TLS, handshake).
    request_timeout
        Seconds allowed for a round trip: subscription confirmation,
        publish confirmation, JetStream API calls.
    reconnect_min
        Seconds before the first reconnection attempt; doubled each time.
    reconnect_max
        Longest wait between two reconnection attempts, in seconds.
    ping_interval
        Seconds between keepalive pings; the connection is considered dead
        after two unanswered pings.
    idle_heartbeat
        Seconds between JetStream consumer heartbeats (gap detection).
    publish_flush
        Core NATS only: wait for the server to confirm each publish (one
        round trip) so a successful ``publish`` means the server has it.
    name
        Connection name, shown by the server's monitoring (``/connz``).
    """

    name: ClassVar[str] = "nats"
    broker: ClassVar[str] = "NATS"

    def __init__(
        self,
        url: str = DEFAULT_URL,
        prefix: str = DEFAULT_PREFIX,
        jetstream: bool = False,
        stream: str = DEFAULT_STREAM,
        create_stream: bool = True,
        stream_max_age: float = DEFAULT_STREAM_MAX_AGE_S,
        stream_max_msgs_per_subject: int = DEFAULT_STREAM_MAX_MSGS_PER_SUBJECT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
        ping_interval: float = DEFAULT_PING_INTERVAL_S,
        idle_heartbeat: float = DEFAULT_IDLE_HEARTBEAT_S,
        publish_flush: bool = True,
        name: str = DEFAULT_CLIENT_NAME,
        **renamed: Any,
    ) -> None:
        reject_renamed("nats", renamed)
        self._servers = [s.strip() for s in url.split(",") if s.strip()]
        if not self._servers:
            raise ConfigurationError("nats url must name at least one server")
        if prefix and (not prefix.endswith(".") or subject_problem(prefix[:-1])):
            raise ConfigurationError(
                f"nats prefix {prefix!r} must be empty or a valid subject ending with '.'"
                " (e.g. 'gochan.')"
            )
        if jetstream and not prefix:
            raise ConfigurationError(
                "nats jetstream needs a prefix (e.g. 'gochan.'): the stream holds '<prefix>>'"
            )
        if jetstream and (not stream or subject_problem(stream) or "." in stream):
            raise ConfigurationError(f"invalid JetStream stream name {stream!r}")
        require_positive(
            "nats",
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            ping_interval=ping_interval,
            idle_heartbeat=idle_heartbeat,
        )
        self._url = ",".join(redact_url(s) for s in self._servers)
        self._prefix = prefix
        self._jetstream = jetstream
        self._stream = stream
        self._create_stream = create_stream
        self._stream_max_age_s = stream_max_age
        self._stream_max_msgs_per_subject = stream_max_msgs_per_subject
        self._connect_timeout_s = connect_timeout
        self._request_timeout_s = request_timeout
        self._ping_interval_s = ping_interval
        self._idle_heartbeat_s = idle_heartbeat
        self._publish_flush = publish_flush
        self._client_name = name

        super().__init__(reconnect_min, reconnect_max)
        self._nc: DirectClient | None = None
        # Topics the streamer holds (including any being restored) and the
        # live broker subscription of each.
        self._topics: TopicSet = TopicSet()
        self._subs: dict[str, Sub] = {}
        # JetStream: last stream sequence delivered (or skipped) per topic.
        self._positions: dict[str, int] = {}
        # Lower-cased subject -> the server's refusal (see PERMISSION_RE).
        self._denied: dict[str, str] = {}
        # The round trip callers may still join, and every one not ended
        # with its connection, oldest first (see _round_trip).
        self._next_trip: tuple[DirectClient, asyncio.Task[None]] | None = None
        self._trips: dict[asyncio.Task[None], DirectClient] = {}

    # -- Driver protocol ---------------------------------------------------

    def _where(self) -> str:
        return f"NATS at {self._url}"

    def _broker_stats(self) -> dict[str, Any]:
        return {"jetstream": self._jetstream, "broker_subscriptions": len(self._subs)}

    def check_topic(self, topic: str) -> None:
        if not topic:
            raise InvalidTopicError(topic, "empty topic")
        problem = subject_problem(topic)
        if problem is None and not self._prefix and topic.startswith("$"):
            problem = "subjects starting with '$' are reserved by the NATS server"
        if problem is not None:
            raise InvalidTopicError(topic, problem)

    async def subscribe(self, topic: str) -> None:
        self._check_open()
        self.check_topic(topic)
        nc = self._connected()
        if topic in self._topics:
            return
        self._topics.add(topic)
        try:
            last_seq = await self._stream_last_seq(nc) if self._jetstream else None
            subs, failures = await self._open_subs(nc, [topic], last_seq)
        except BaseException:
            self._forget(topic)
            raise
        if topic in failures:
            self._forget(topic)
            raise BrokerError(failures[topic])
        sub = subs[topic]
        if topic in self._topics and self._nc is nc and topic not in self._subs:
            self._subs[topic] = sub
            return
        # Unsubscribed meanwhile (and maybe subscribed again by a call that
        # finished first), or the connection was lost: this one is not needed.
        await self._quiet_unsubscribe(sub, settle=True)
        if self._nc is not nc:
            raise BrokerConnectionError("connection to NATS lost while subscribing")

    async def unsubscribe(self, topic: str) -> None:
        self._forget(topic)
        sub = self._subs.pop(topic, None)
        if sub is not None:
            await self._quiet_unsubscribe(sub, settle=True)

    async def publish(self, topic: str, data: bytes) -> str | None:
        self._check_open()
        self.check_topic(topic)
        # Not while the subscriptions are being restored: a core NATS message
        # published before this node's SUB is processed never reaches it.
        nc = self._connected()
        subject = self._prefix + topic
        try:
            if self._jetstream:
                js = nc.jetstream(timeout=self._request_timeout_s)
                ack = await js.publish(subject, data, stream=self._stream)
                self._published += 1
                return str(ack.seq)
            await nc.publish(subject, data)
            if self._publish_flush:
                await self._confirm(nc)
        except PUBLISH_ERRORS as exc:
            raise _publish_error(exc, subject, data) from exc
        self._published += 1
        return None

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> list[str | None]:
        """Core NATS: every PUB into nats-py's buffer, then ONE round trip
        confirms them all. JetStream: every publish sent at once, then their
        acks gathered (one round trip's wait, not one per message)."""
        self._check_open()
        nc = self._connected()
        prefix = self._prefix
        limit = nc.max_payload
        for i, (_, data) in enumerate(messages):
            if len(data) > limit:  # refused before any is sent, not after some
                too_large = BrokerError(
                    f"message {i} of {len(data)} bytes exceeds the NATS server's"
                    f" max_payload ({limit})"
                )
                raise BatchPublishError([], len(messages), too_large)
        if self._jetstream:
            return await self._publish_many_js(nc, messages)
        sent = 0
        failure: BaseException | None = None
        try:
            for topic, data in messages:
                await nc.publish(prefix + topic, data)
                sent += 1
        except PUBLISH_ERRORS as exc:
            failure = exc  # the ones before it are in the buffer: confirm them
        if self._publish_flush and sent:
            try:
                await self._confirm(nc)
            except PUBLISH_ERRORS as exc:
                raise BatchPublishError(
                    [], len(messages), _publish_error(exc, prefix + messages[0][0], b"")
                ) from exc
        self._published += sent
        ids: list[str | None] = [None] * sent
        if failure is not None:
            topic, data = messages[sent]
            error = _publish_error(failure, prefix + topic, data)
            raise BatchPublishError(ids, len(messages), error) from failure
        return ids

    async def _publish_many_js(
        self, nc: DirectClient, messages: Sequence[tuple[str, bytes]]
    ) -> list[str | None]:
        js = nc.jetstream(timeout=self._request_timeout_s)
        prefix, stream = self._prefix, self._stream
        # The tasks start in batch order and nats-py queues each PUB before
        # its first await, so the stream numbers the messages in that order.
        acks = await asyncio.gather(
            *(js.publish(prefix + topic, data, stream=stream) for topic, data in messages),
            return_exceptions=True,
        )
        ids: list[str | None] = []
        for (topic, data), ack in zip(messages, acks, strict=True):
            if isinstance(ack, BaseException):
                if not isinstance(ack, PUBLISH_ERRORS):
                    raise ack
                error = _publish_error(ack, prefix + topic, data)
                raise BatchPublishError(ids, len(messages), error) from ack
            ids.append(str(ack.seq))
            self._published += 1
        return ids

    async def _confirm(self, nc: DirectClient) -> None:
        """One round trip: the server has every PUB sent on ``nc`` before."""
        await self._round_trip(nc)
        if nc is not self._nc:  # replaced meanwhile: the messages may be with it
            raise BrokerConnectionError("connection to NATS lost while publishing")

    async def _close(self) -> None:
        nc, self._nc = self._nc, None
        subs = list(self._subs.values())
        self._subs.clear()
        self._topics.clear()
        self._positions.clear()
        for sub in subs:
            if nc is not None and nc.is_connected:
                await self._quiet_unsubscribe(sub)
            else:
                stop_consumer_tasks(sub)
        self._next_trip = None
        trips = list(self._trips)
        for task in trips:
            task.cancel()
        await asyncio.gather(*trips, return_exceptions=True)
        if nc is not None:
            await self._discard(nc)

    # -- replay (DurableDriver) ---------------------------------------------

    @property
    def durable(self) -> bool:
        """True with JetStream: event ids are stream sequences that replay reads."""
        return self._jetstream

    def event_position(self, event_id: str) -> int | None:
        if not self._jetstream or not (event_id.isascii() and event_id.isdigit()):
            return None
        return int(event_id)

    async def replay(
        self, topics: Sequence[str], after: int
    ) -> AsyncGenerator[tuple[str, bytes, str], None]:
        if not self._jetstream:
            raise ReplayGapError("core NATS keeps no messages to replay")
        js = self._connected().jetstream(timeout=self._request_timeout_s)
        messages = replay_stream(
            js, self._stream, self._prefix, topics, after, self._request_timeout_s
        )
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield message

    # -- connection --------------------------------------------------------

    def _connected(self) -> DirectClient:
        self._check_ready()
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise BrokerConnectionError(f"not connected to NATS at {self._url} (reconnecting)")
        return nc

    async def _open(self) -> DirectClient:
        """A new connection (stream ensured with JetStream), or BrokerError."""
        nc = DirectClient(self._deliver)
        connect_errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            if nc is self._nc:
                await self._on_error(nc, exc)
            else:
                connect_errors.append(exc)

        async def on_disconnected() -> None:
            self._lost(nc, "disconnected")

        async def on_closed() -> None:
            self._lost(nc, "lost the connection")

        try:
            await within(
                nc.connect(
                    servers=self._servers,
                    name=self._client_name,
                    allow_reconnect=False,
                    # Even without reconnects nats-py retries the initial
                    # connect (max_reconnect_attempts times per server, waiting
                    # reconnect_time_wait in between): once more, at once.
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, round(self._connect_timeout_s)),
                    ping_interval=max(1, round(self._ping_interval_s)),
                    max_outstanding_pings=DEFAULT_MAX_OUTSTANDING_PINGS,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    closed_cb=on_closed,
                ),
                self._connect_timeout_s,
            )
            if self._jetstream:
                await self._ensure_stream(nc)
        except BaseException as exc:
            await self._discard(nc)
            if isinstance(exc, BrokerError) or not isinstance(exc, Exception):
                raise
            cause = connect_errors[-1] if connect_errors else exc
            raise BrokerConnectionError(
                f"cannot connect to NATS at {self._url}: {cause!r}"
            ) from exc
        return nc

    async def _discard(self, nc: DirectClient) -> None:
        if nc is self._nc:  # a new connection that failed while being restored
            self._nc = None
            self._drop_subs()
        try:
            await within(nc.close(), self._request_timeout_s)
        except Exception as exc:  # closing a broken connection may fail: it is gone anyway
            broker_logger.debug("closing a NATS connection failed: %r", exc)

    async def _ensure_stream(self, nc: DirectClient) -> None:
        await ensure_stream(
            nc.jetstream(timeout=self._request_timeout_s),
            api.StreamConfig(
                name=self._stream,
                subjects=[self._prefix + ">"],
                storage=api.StorageType.FILE,
                max_age=self._stream_max_age_s,
                max_msgs_per_subject=self._stream_max_msgs_per_subject,
            ),
            self._create_stream,
        )

    async def _stream_last_seq(self, nc: DirectClient) -> int:
        return await stream_last_seq(nc.jetstream(timeout=self._request_timeout_s), self._stream)

    async def _on_error(self, nc: DirectClient, exc: Exception) -> None:
        match = PERMISSION_RE.search(str(exc))
        if match is None:
            broker_logger.warning("NATS error: %s", exc)
            return
        key = match.group(1)
        self._denied[key] = str(exc)
        # A subscription being opened checks _denied itself after its flush;
        # one that was already open has just been revoked by the server.
        for topic, sub in list(self._subs.items()):
            if (self._prefix + topic).lower() == key:
                self._forget(topic)
                del self._subs[topic]
                await self._quiet_unsubscribe(sub)
                self._report_failure(topic, str(exc))

    def _lost(self, nc: DirectClient, why: str) -> None:
        """``nc`` no longer serves (if it is the live connection): not ready,
        its subscriptions forgotten (the topics stay held), and the
        supervisor closes it and reconnects."""
        if nc is not self._nc:
            return
        self._nc = None
        self._drop_subs()
        self._lose(why)

    def _drop_subs(self) -> None:
        for sub in self._subs.values():
            stop_consumer_tasks(sub)
        self._subs.clear()

    async def _round_trip(self, nc: DirectClient) -> None:
        """Wait until the server has processed every command queued on ``nc``
        before this call: :func:`flush`, shared.

        A group commit. At most ROUND_TRIPS_IN_FLIGHT round trips are under
        way per connection; a caller that comes when that many are waits for
        the next, with every caller that comes until the oldest one ends and
        it starts, since its PING follows all their commands. So a burst of
        subscribes (10,000 connects, a topic each) or of confirmed publishes
        costs a PING per round trip time, not one each (a round trip is about
        100 us of this process's CPU here). A lone caller starts its own at
        once. A caller that is cancelled while it waits leaves the round trip
        to the others.
        """
        trip = self._next_trip
        if trip is None or trip[0] is not nc:
            flying = [task for task, on in self._trips.items() if on is nc]
            limit = ROUND_TRIPS_IN_FLIGHT
            before = flying[-limit] if len(flying) >= limit else None
            task = asyncio.ensure_future(self._one_trip(nc, before))
            task.add_done_callback(self._trip_done)
            self._trips[task] = nc
            trip = self._next_trip = (nc, task)
        await asyncio.shield(trip[1])

    def _trip_done(self, task: asyncio.Task[None]) -> None:
        self._trips.pop(task, None)
        if not task.cancelled():
            task.exception()  # its waiters have it; none may be left

    async def _one_trip(self, nc: DirectClient, before: asyncio.Task[None] | None) -> None:
        """One round trip for :meth:`_round_trip`, once ``before`` (the
        oldest under way when it was made, if there were as many as allowed)
        has ended.

        A round trip that times out means a server that is frozen or cut off
        without the socket being closed: the connection is given up, a new
        one made and every held topic subscribed again; meanwhile the driver
        is not ready and refuses publishes. A round trip queued behind it
        fails at once instead of waiting as long again.
        """
        if before is not None:
            await asyncio.wait((before,))  # its outcome is its own callers'
        trip = self._next_trip
        if trip is not None and trip[1] is asyncio.current_task():
            self._next_trip = None  # from now on a caller needs a later PING
        if nc is not self._nc:
            raise nats.errors.ConnectionClosedError
        try:
            await flush(nc, self._request_timeout_s)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            why = f"no answer within {self._request_timeout_s}s on the connection"
            self._lost(nc, why)
            raise

    async def _serve(self, nc: DirectClient) -> str:
        """A round trip on ``nc`` every ``ping_interval`` until it is lost.

        nats-py's own pings cannot tell a dead read loop (nothing delivered,
        the connection still "connected") until several intervals have
        passed; a round trip that times out replaces the connection at once
        (:meth:`_round_trip`), whether or not anything is being published.
        """
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await within(self._lost_event.wait(), self._ping_interval_s)
                return self._lost_why
            try:
                await self._round_trip(nc)
            except CONNECTION_ERRORS as exc:
                return f"round trip failed: {exc!r}"

    async def _restore(self, nc: DirectClient) -> bool:
        """Make ``nc`` the connection and subscribe every held topic on it;
        False if ``nc`` was lost meanwhile."""
        self._nc = nc
        topics = sorted(self._topics)
        if not topics:
            return nc.is_connected
        last_seq: int | None = None
        if self._jetstream:
            last_seq = await self._stream_last_seq(nc)
            for topic, position in list(self._positions.items()):
                if position > last_seq:  # the stream was purged or recreated
                    broker_logger.warning(
                        "JetStream stream %s restarted below sequence %d; topic %r resumes at %d",
                        self._stream,
                        position,
                        topic,
                        last_seq,
                    )
                    self._positions[topic] = last_seq
        subs, failures = await self._open_subs(nc, topics, last_seq)
        for topic, sub in subs.items():
            if topic in self._topics and self._nc is nc and topic not in self._subs:
                self._subs[topic] = sub
            else:
                await self._quiet_unsubscribe(sub)
        for topic, message in failures.items():
            if topic in self._topics:
                self._forget(topic)
                self._report_failure(topic, message)
        return self._nc is nc and nc.is_connected

    # -- subscriptions -----------------------------------------------------

    async def _open_subs(
        self, nc: DirectClient, topics: list[str], last_seq: int | None
    ) -> tuple[dict[str, Sub], dict[str, str]]:
        """Subscribe ``topics`` on ``nc`` and wait for the server to have them.

        Returns the subscriptions and, per refused topic, the server's reason.
        Raises BrokerConnectionError if the connection fails meanwhile.
        """
        subs: dict[str, Sub] = {}
        failures: dict[str, str] = {}
        try:
            for topic in topics:
                if topic not in self._topics:
                    continue
                subject = self._prefix + topic
                self._denied.pop(subject.lower(), None)
                try:
                    subs[topic] = await self._open_sub(nc, topic, subject, last_seq)
                except nats.js.errors.APIError as exc:
                    failures[topic] = f"JetStream refused the consumer for {subject!r}: {exc}"
            # Any -ERR for these SUBs arrives before the PONG, and nats-py runs
            # error_cb inline while reading, so _denied is complete after this.
            await self._round_trip(nc)
        except BaseException as exc:
            for sub in subs.values():
                await self._quiet_unsubscribe(sub)
            if isinstance(exc, CONNECTION_ERRORS):
                raise BrokerConnectionError(f"NATS subscription failed: {exc!r}") from exc
            if isinstance(exc, nats.errors.Error):
                raise BrokerError(f"NATS subscription failed: {exc}") from exc
            raise
        for topic in list(subs):
            refusal = self._denied.pop((self._prefix + topic).lower(), None)
            if refusal is not None:
                await self._quiet_unsubscribe(subs.pop(topic))
                failures[topic] = refusal
        return subs, failures

    async def _open_sub(
        self, nc: DirectClient, topic: str, subject: str, last_seq: int | None
    ) -> Sub:
        if not self._jetstream:
            return await nc.subscribe_direct(subject, topic)
        callback = self._callback(topic)
        assert last_seq is not None
        start = self._positions.setdefault(topic, last_seq)
        js = nc.jetstream(timeout=self._request_timeout_s)
        return await js.subscribe(
            subject,
            cb=callback,
            stream=self._stream,
            ordered_consumer=True,
            idle_heartbeat=self._idle_heartbeat_s,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start + 1),
        )

    def _callback(self, topic: str) -> Callable[[Msg], Awaitable[None]]:
        jetstream = self._jetstream

        async def on_msg(msg: Msg) -> None:
            event_id: str | None = None
            if jetstream and topic in self._topics:
                seq = msg.metadata.sequence.stream
                if seq <= self._positions.get(topic, 0):
                    return  # redelivered by a consumer reset
                self._positions[topic] = seq
                event_id = str(seq)
            self._deliver(topic, msg.data, event_id)

        return on_msg

    async def _quiet_unsubscribe(self, sub: Sub, settle: bool = False) -> None:
        """UNSUB, ignoring a dead connection. ``settle``: also wait until the
        server has processed it, so that the caller returns with the broker in
        the state it reports (nats-py only queues the UNSUB)."""
        try:
            await sub.unsubscribe()
            nc = self._nc
            if settle and nc is not None and nc.is_connected:
                await self._round_trip(nc)
        except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
            broker_logger.debug("NATS unsubscribe failed: %r", exc)  # the connection went with it
        stop_consumer_tasks(sub)

    def _forget(self, topic: str) -> None:
        self._topics.discard(topic)
        self._positions.pop(topic, None)
