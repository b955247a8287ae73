"""What the NATS driver needs to know of nats-py: its connection errors,
subject rules, a true round trip, stopping a JetStream subscription's tasks,
core messages handed over without a task (the three places that use nats-py
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
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from ..errors import BrokerConnectionError, BrokerError, ReplayGapError
from ..log import broker_logger

__all__ = [
    "CONNECTION_ERRORS",
    "PERMISSION_RE",
    "DirectClient",
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


def subject_problem(subject: str) -> str | None:
    """Why ``subject`` is not a literal NATS subject, or None if it is one."""
    for ch in subject:
        if ch.isspace():
            return "NATS subjects cannot contain whitespace"
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return "NATS subjects cannot contain control characters"
        if ch in WILDCARDS:
            return f"{ch!r} is a NATS wildcard"
    if "" in subject.split("."):
        return "'.' separates NATS subject tokens, which cannot be empty"
    return None


async def flush(nc: Client, timeout_s: float) -> None:
    """Wait until the server has processed every command sent before: a
    PING/PONG round trip (``Client.rtt``).

    The PING must follow the earlier SUB and PUB commands: nats-py writes it
    straight to the socket while they may still sit in the pending buffer
    waiting for the flusher task, so the PONG could come back before the
    server has seen them (a message published just after ``subscribe``
    returned would be missed, a refused SUB reported late). So first wait for
    the flusher to have written the pending buffer
    (``_flush_pending(force_flush=True)`` waits for exactly that).

    Not ``Client.flush``: when nats-py's read loop has died it skips the round
    trip and returns at once, so a publish would look delivered while nothing
    is read from the server any more. ``rtt`` always waits for the PONG.
    A timeout here leaves the connection unusable (see ``_round_trip``).
    """
    flush_pending = getattr(nc, "_flush_pending", None)
    if flush_pending is not None:
        await asyncio.wait_for(flush_pending(force_flush=True), timeout_s)
    else:  # the flusher was woken when the commands were queued: let it run
        await asyncio.sleep(0)
    # nats-py annotates the timeout as int; asyncio takes float seconds.
    await nc.rtt(timeout=cast(int, timeout_s))


class DirectClient(Client):
    """nats-py's client, with core subscriptions that hand each message
    straight to a function.

    nats-py queues every message on its subscription's asyncio.Queue for a
    task of that subscription to await and pass to the callback: a queue
    put, a get and a task switch per message, about half of the server CPU
    a message from NATS cost (bench/profiles/notifications.md), and one
    task per topic held. A subscription registered in ``direct`` (by its
    sid, made without a callback so it has no task) skips all that: its
    messages reach ``direct[sid](data)`` from the parser, in the order they
    arrived. JetStream subscriptions keep nats-py's path (their ordering
    and flow control live there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.direct: dict[int, Callable[[bytes], None]] = {}

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        deliver = self.direct.get(sid)
        if deliver is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        deliver(data)  # headers, if a publisher sent any, carry nothing gochan relays


def stop_consumer_tasks(sub: Subscription) -> None:
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
