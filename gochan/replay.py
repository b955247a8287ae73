"""Replay: what a stream reconnecting with ``Last-Event-ID`` missed, then the
hand-off to live delivery, with nothing lost and nothing twice.

Two sources. gochan numbers every message a driver does not number itself
(``<epoch>-<seq>``) and keeps the frames in an in-memory :class:`History`, so
replay works on one node for every such driver. A durable driver (JetStream)
numbers its messages and replays them from the broker, while the live frames
of the stream's topics are held back and sent after it, less the ones the
replay covered.

Nothing is awaited from the history read to joining the live fan-out, so a
message is either replayed or live. A long replay is written in slices as the
socket drains, so it never trips the slow-consumer bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ._fast import encode_event
from .config import Config
from .drivers import Driver, DurableDriver
from .errors import BrokerError, ReplayGapError
from .frames import replay_frame
from .history import History
from .log import logger
from .stream import Stream

__all__ = ["REPLAY_SLICE_BYTES", "ReplayState", "Replayer"]

# Replay is written in slices of this many bytes, the next one once the
# socket has taken the last, so a long backlog never sits in memory twice.
REPLAY_SLICE_BYTES = 256 * 1024


class ReplayState:
    """One stream's replay while it runs: the in-memory cursor, or the live
    frames held (with their broker positions) during a broker replay."""

    __slots__ = ("drained_event", "held", "held_bytes", "replayer", "seq")

    def __init__(self, replayer: Replayer, seq: int | None) -> None:
        self.replayer = replayer
        self.seq = seq  # in memory: the last sequence number sent
        self.held: list[tuple[int | None, bytes]] | None = None if seq is not None else []
        self.held_bytes = 0
        self.drained_event: asyncio.Event | None = None

    def drained(self, stream: Stream) -> None:
        """The stream's socket drained: the next slice may go."""
        if self.seq is not None:
            self.replayer.step(stream)
        if self.drained_event is not None:
            self.drained_event.set()


class Replayer:
    """The replay layer of one :class:`~gochan.Streamer`."""

    def __init__(
        self,
        config: Config,
        driver: Driver,
        counters: dict[str, int],
        join: Callable[[Stream], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.config = config
        self.history = History(config.history_size, config.history_bytes, config.history_age)
        self.durable = driver if isinstance(driver, DurableDriver) and driver.durable else None
        self.counters = counters
        self._join = join
        self._spawn = spawn
        # Event ids are "<epoch>-<seq>": the random epoch tells this process's
        # ids from an earlier run's, so a stale Last-Event-ID is recognised.
        self.epoch = secrets.token_hex(4)
        self.seq = 0
        self._from_broker: set[Stream] = set()  # streams whose live frames are held

    # -- numbering ---------------------------------------------------------

    def frame(self, topic: str, data: bytes, event_id: str | None, kept: bool) -> tuple[str, bytes]:
        """The message's id and frame: a durable broker's id (a position it
        can replay from), or else the next of ours, kept for replay when
        ``kept`` (someone holds the topic here). An id from a driver that
        cannot replay (an SQS message id, say) names nothing gochan could
        resume from, so gochan numbers the message itself."""
        if event_id is not None and self.durable is not None:
            frame = encode_event(topic, event_id, data)
            if self._from_broker:
                self._hold(topic, event_id, frame)
            return event_id, frame
        self.seq += 1
        event_id = f"{self.epoch}-{self.seq}"
        frame = encode_event(topic, event_id, data)
        if kept and self.history.enabled:
            self.history.add(self.seq, topic, frame, time.monotonic())
        return event_id, frame

    def _parse(self, event_id: str) -> int | None:
        epoch, _, seq = event_id.rpartition("-")
        if epoch != self.epoch or not seq.isdigit():
            return None  # another process's or another run's id
        return int(seq)

    # -- starting ----------------------------------------------------------

    def start(self, stream: Stream, last_event_id: str) -> None:
        """Replay what ``stream`` missed after ``last_event_id`` (its head is
        queued already), then join it to the live fan-out."""
        if self.durable is not None:
            position = self.durable.event_position(last_event_id)
            if position is not None:
                stream.replay = ReplayState(self, None)
                self._from_broker.add(stream)
                self._spawn(self._replay_from_broker(stream, position, last_event_id))
                return
        seq = self._parse(last_event_id)
        recovered = (
            seq is not None
            and self.history.enabled
            and self.history.complete_after(seq, stream.client.topics)
        )
        self.counters["replay_hits" if recovered else "replay_misses"] += 1
        stream.send(replay_frame(last_event_id, recovered))
        if recovered:
            assert seq is not None
            stream.replay = ReplayState(self, seq)
            self.step(stream)
        else:
            self._join(stream)

    # -- from memory -------------------------------------------------------

    def step(self, stream: Stream) -> None:
        """Send the next slice of an in-memory replay, or join when done."""
        state = stream.replay
        if state is None or state.seq is None:
            return
        if stream.closed:
            stream.replay = None
            return
        if stream.paused:
            return  # drained() continues once the socket has taken it
        if stream.pending_bytes:
            # Queued and not flushed yet (its head, the last slice): the flush
            # is scheduled first, so this step comes after it.
            asyncio.get_running_loop().call_soon(self.step, stream)
            return
        topics = set(stream.client.topics)
        seq = state.seq
        if not self.history.complete_after(seq, topics):
            # The history moved past this stream while it read: it reconnects
            # and is told it was not recovered.
            stream.replay = None
            stream.hub.finish(stream)
            return
        budget = REPLAY_SLICE_BYTES
        for item in self.history.after(seq):
            seq = item.seq
            if item.topic in topics:
                stream.send(item.frame)
                budget -= len(item.frame)
                if budget <= 0:
                    state.seq = seq
                    asyncio.get_running_loop().call_soon(self.step, stream)
                    return
        stream.replay = None
        self._join(stream)

    # -- from a durable broker ---------------------------------------------

    def _hold(self, topic: str, event_id: str, frame: bytes) -> None:
        assert self.durable is not None
        position = self.durable.event_position(event_id)
        for stream in list(self._from_broker):
            state = stream.replay
            if state is None or state.held is None or not stream.client.has_topic(topic):
                continue
            state.held.append((position, frame))
            state.held_bytes += len(frame)
            if state.held_bytes > self.config.max_pending_bytes:
                # Live traffic outran the replay: a slow consumer.
                self.forget(stream)
                stream.hub.finish(stream)

    async def _replay_from_broker(self, stream: Stream, position: int, last_event_id: str) -> None:
        """Replay from the broker while live frames are held, then send the
        held ones the replay did not cover and join the live fan-out."""
        driver = self.durable
        assert driver is not None
        client = stream.client
        sent_upto = position
        answered = False
        try:
            replay = driver.replay(client.topics, position)
            try:
                async for topic, data, event_id in replay:
                    if not answered:
                        answered = True
                        self.counters["replay_hits"] += 1
                        stream.send(replay_frame(last_event_id, True))
                    if stream.closed:
                        return
                    if client.has_topic(topic):
                        stream.send(encode_event(topic, event_id, data))
                    sent_upto = max(sent_upto, driver.event_position(event_id) or sent_upto)
                    if stream.paused or stream.pending_bytes >= REPLAY_SLICE_BYTES:
                        await self._wait_drained(stream)
            finally:
                await replay.aclose()
            if not answered:
                answered = True
                self.counters["replay_hits"] += 1
                stream.send(replay_frame(last_event_id, True))
        except (ReplayGapError, BrokerError) as exc:
            if answered:
                # Part of it went out; the rest cannot: make the browser
                # reconnect and be told it was not recovered.
                logger.warning("replay failed midway: %s", exc)
                self.forget(stream)
                stream.hub.finish(stream)
                return
            self.counters["replay_misses"] += 1
            stream.send(replay_frame(last_event_id, False))
        finally:
            state = stream.replay
            self.forget(stream)
        if stream.closed or state is None or state.held is None:
            return
        # In position order: live frames of several topics can arrive from
        # the broker's per-topic subscriptions out of their publish order.
        held = sorted(state.held, key=lambda item: (item[0] is None, item[0] or 0))
        for held_position, frame in held:
            if held_position is None or held_position > sent_upto:
                stream.send(frame)
        self._join(stream)

    async def _wait_drained(self, stream: Stream) -> None:
        state = stream.replay
        while not stream.closed and (stream.paused or stream.pending_bytes):
            if stream.paused and state is not None:
                if state.drained_event is None:
                    state.drained_event = asyncio.Event()
                state.drained_event.clear()
                await state.drained_event.wait()
            else:
                await asyncio.sleep(0)  # the flush runs at the end of this iteration

    # -- ending ------------------------------------------------------------

    def forget(self, stream: Stream) -> None:
        """The stream is gone or done: drop its replay state, wake its waits."""
        state = stream.replay
        stream.replay = None
        self._from_broker.discard(stream)
        if state is not None and state.drained_event is not None:
            state.drained_event.set()
