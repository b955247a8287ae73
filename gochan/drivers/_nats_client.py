"""What the NATS driver needs to know of nats-py: its connection errors,
subject rules, a true round trip, stopping a JetStream subscription's tasks,
core subscriptions with no nats-py Subscription (these three use nats-py
internals, which the ``<3`` bound of the ``nats`` extra and
tests/drivers/test_nats.py pin), and JetStream replay."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import cast

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from ..errors import BrokerConnectionError, BrokerError, ReplayGapError
from ..log import broker_logger

__all__ = [
    "CONNECTION_ERRORS",
    "PERMISSION_RE",
    "DirectClient",
    "DirectSubscription",
    "ensure_stream",
    "flush",
    "replay_stream",
    "stop_consumer_tasks",
    "stream_last_seq",
    "subject_problem",
]

REPLAY_BATCH = 256  # messages fetched per round trip when replaying
REPLAY_CONSUMER_IDLE_S = 30.0  # the server drops a forgotten replay consumer after this

WILDCARDS = frozenset("*>")
# nats-py lower-cases the server's -ERR text before handing it to error_cb.
PERMISSION_RE = re.compile(r'permissions violation for subscription to "(.*?)"')

# Failures of the connection itself, as opposed to a refusal of one operation.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    asyncio.TimeoutError,
    OSError,
)


# The first character that cannot be in a literal subject: whitespace (``\s``
# is str.isspace's set), a control character or a wildcard.
NOT_LITERAL = re.compile(r"[\s\x00-\x1f\x7f*>]")


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` is not a literal NATS subject, or None if it is one.

    Called for every topic a publish or subscribe names: one regex scan,
    not a Python loop per character (0.6 against 0.3 us for a short topic,
    16 against 1.6 us for 256 characters)."""
    found = NOT_LITERAL.search(subject)
    if found is not None:
        ch = found.group()
        if ch.isspace():
            return "NATS subjects cannot contain whitespace"
        if ch in WILDCARDS:
            return f"{ch!r} is a NATS wildcard"
        return "NATS subjects cannot contain control characters"
    if not subject or subject[0] == "." or subject[-1] == "." or ".." in subject:
        return "'.' separates NATS subject tokens, which cannot be empty"
    return None


async def flush(nc: DirectClient, timeout_s: float) -> None:
    """Wait until the server has processed every command queued on ``nc``
    before: a PING/PONG round trip after them (:meth:`DirectClient.ping`).

    Not ``Client.flush``: when nats-py's read loop has died it skips the round
    trip and returns at once, so a publish would look delivered while nothing
    is read from the server any more. Nor ``Client.rtt``: it writes its PING
    straight to the socket while earlier commands may still wait in the
    pending buffer for the flusher task, so the PONG could come back before
    the server has seen them; and when it times out it cancels the PONG's
    future, which the late PONG then fails to resolve, killing the read loop.
    Here the PONG's future is never cancelled. A timeout still means the
    connection is unusable (see ``NatsDriver._one_trip``).
    """
    pong = nc.ping()
    done, _ = await asyncio.wait((pong,), timeout=timeout_s)
    if not done:
        raise nats.errors.TimeoutError
    pong.result()


class DirectClient(Client):
    """nats-py's client, with core subscriptions that hand each message
    straight to a function.

    nats-py queues every message on its subscription's asyncio.Queue for a
    task of that subscription to await and pass to the callback: a queue
    put, a get and a task switch per message, about half of the server CPU
    a message from NATS cost (bench/profiles/notifications.md), and one
    task per topic held. Its ``Subscription`` holds two asyncio queues
    too, 3.8 KiB of the 4.1 KiB one costs, which for per-user topics is
    most of a connection's memory. A subscription made by
    :meth:`subscribe_direct` has none of that: its sid maps to its topic in
    ``direct``, and its messages reach ``deliver(topic, data)`` from the
    parser in the order they arrived. JetStream subscriptions keep
    nats-py's path (their ordering and flow control live there).
    """

    def __init__(self, deliver: Callable[[str, bytes], None]) -> None:
        super().__init__()
        self.deliver = deliver
        self.direct: dict[int, str] = {}

    async def subscribe_direct(self, subject: str, topic: str) -> DirectSubscription:
        """SUB ``subject`` (a literal subject the caller has checked), its
        messages to ``deliver`` as ``topic``'s. The SUB is only queued: the
        :meth:`ping` that must follow to know the server has it (or refused
        it) writes it, and no flusher wakeup is spent on it."""
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining:
            raise nats.errors.ConnectionDrainingError
        self._sid += 1
        sid = self._sid
        self.direct[sid] = topic
        await self._send_command(b"SUB %s %d\r\n" % (subject.encode(), sid))
        return DirectSubscription(self, sid)

    def ping(self) -> asyncio.Future[bool]:
        """Write the commands queued for the flusher and a PING after them,
        now and at once; the future is resolved by the PONG.

        nats-py's keepalive PINGs are written straight to the socket too and
        register their PONG future in the same list at the same moment, so
        the PONGs, which come in PING order, resolve the right futures."""
        transport = self._transport
        if transport is None or not self.is_connected:
            raise nats.errors.ConnectionClosedError
        pong = asyncio.get_running_loop().create_future()
        commands = self._pending
        self._pending = []
        self._pending_data_size = 0
        commands.append(b"PING\r\n")
        self._pongs.append(pong)
        transport.writelines(commands)
        return pong

    async def unsubscribe_direct(self, sid: int) -> None:
        """UNSUB ``sid``; what still arrives for it is dropped."""
        self.direct.pop(sid, None)
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining:
            raise nats.errors.ConnectionDrainingError
        if not self.is_reconnecting:
            await self._send_command(b"UNSUB %d\r\n" % sid)
            await self._flush_pending()

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        topic = self.direct.get(sid)
        if topic is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        self.deliver(topic, data)  # headers, if a publisher sent any, carry nothing gochan relays


class DirectSubscription:
    """A subscription of :meth:`DirectClient.subscribe_direct`: its sid, on
    its connection."""

    __slots__ = ("conn", "sid")

    def __init__(self, conn: DirectClient, sid: int) -> None:
        self.conn = conn
        self.sid = sid

    async def unsubscribe(self) -> None:
        await self.conn.unsubscribe_direct(self.sid)


def stop_consumer_tasks(sub: object) -> None:
    """Cancel the heartbeat and flow-control tasks of a JetStream subscription.

    nats-py cancels them in ``PushSubscription.unsubscribe`` only when the
    connection is still open; after a lost connection its heartbeat task
    would sleep on for two heartbeat intervals before noticing.
    """
    jsi = getattr(getattr(sub, "_sub", None), "_jsi", None)
    for name in ("_hbtask", "_fctask"):
        task = getattr(jsi, name, None)
        if isinstance(task, asyncio.Task):
            task.cancel()


async def replay_stream(
    js: JetStreamContext,
    stream: str,
    prefix: str,
    topics: Sequence[str],
    after: int,
    timeout_s: float,
) -> AsyncGenerator[tuple[str, bytes, str], None]:
    """What :meth:`NatsDriver.replay` yields: the messages of ``stream`` on
    ``topics`` after sequence ``after``, read by a temporary pull consumer
    up to the stream's last message at the call."""
    wanted = {prefix + topic: topic for topic in topics}
    try:
        info = await js.stream_info(stream)
    except CONNECTION_ERRORS as exc:
        raise BrokerConnectionError(f"JetStream stream info failed: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise BrokerError(f"JetStream stream info failed: {exc}") from exc
    first, last = info.state.first_seq, info.state.last_seq
    if after > last:
        raise ReplayGapError(f"sequence {after} is beyond stream {stream}'s last ({last})")
    if after + 1 < first:
        raise ReplayGapError(f"stream {stream} no longer keeps sequence {after + 1}")
    if after == last or not wanted:
        return
    # One subject: the server filters; several: read the stream, filter here
    # (nats-server 2.9 takes one filter subject per consumer).
    subject = next(iter(wanted)) if len(wanted) == 1 else prefix + ">"
    config = api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=after + 1,
        ack_policy=api.AckPolicy.NONE,
        inactive_threshold=REPLAY_CONSUMER_IDLE_S,
        mem_storage=True,
    )
    try:
        psub = await js.pull_subscribe(subject, stream=stream, config=config)
    except CONNECTION_ERRORS as exc:
        raise BrokerConnectionError(f"JetStream replay failed: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise BrokerError(f"JetStream replay failed: {exc}") from exc
    try:
        pending = (await psub.consumer_info()).num_pending or 0
        seq = after
        while pending > 0 and seq < last:
            msgs = await psub.fetch(REPLAY_BATCH, timeout=timeout_s)
            for msg in msgs:
                meta = msg.metadata
                seq = meta.sequence.stream
                pending = meta.num_pending
                if seq > last:
                    return  # the live consumers have this one
                topic = wanted.get(msg.subject)
                if topic is not None:
                    yield topic, msg.data, str(seq)
    except CONNECTION_ERRORS as exc:
        raise BrokerConnectionError(f"JetStream replay failed: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise BrokerError(f"JetStream replay failed: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            consumer = await psub.consumer_info()
            await js.delete_consumer(stream, consumer.name)
        with contextlib.suppress(Exception):
            await psub.unsubscribe()


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig, create: bool) -> None:
    """See that the stream ``config`` names exists; add it if missing and ``create``."""
    name = config.name
    try:
        try:
            await js.stream_info(cast(str, name))
            return
        except nats.js.errors.NotFoundError:
            if not create:
                raise BrokerError(f"JetStream stream {name!r} does not exist") from None
        await js.add_stream(config)
        broker_logger.info("created JetStream stream %s for subjects %s", name, config.subjects)
    except nats.errors.NoRespondersError as exc:
        raise BrokerError(f"JetStream is not enabled on the NATS server ({exc!r})") from exc
    except nats.js.errors.APIError as exc:
        raise BrokerError(f"JetStream stream {name!r}: {exc}") from exc


async def stream_last_seq(js: JetStreamContext, stream: str) -> int:
    """The sequence of the last message in ``stream``."""
    try:
        info = await js.stream_info(stream)
    except CONNECTION_ERRORS as exc:
        raise BrokerConnectionError(f"JetStream stream info failed: {exc!r}") from exc
    except nats.errors.Error as exc:
        raise BrokerError(f"JetStream stream {stream!r}: {exc}") from exc
    return info.state.last_seq
