"""The lifecycle every broker driver shares (:class:`Lifecycle`).

One explicit :class:`State`; ``connect`` and ``close``; ONE supervisor that
serves a connection until it is lost and then reconnects with jittered
exponential backoff between ``reconnect_min`` and ``reconnect_max``; one
``stats()`` schema; one guarded delivery path from a broker message to
``Receiver.on_message``.

A driver supplies the broker side as five hooks, over its own connection
type ``C`` (a client, a session, or ``None`` where the client library keeps
the connection itself)::

    _open() -> C                     a new connection (raises on failure)
    _restore(conn) -> bool           make it current, subscribe every held
                                     topic again; False if it failed meanwhile
    _serve(conn) -> str | None       return (with why) once it is lost
    _discard(conn)                   close a lost or failed connection
    _close()                         release everything at ``close``

and optionally ``_start``/``_stop`` for clients that outlive connections
(pools, producers), made before the first ``_open`` and released last.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection
from typing import Any, ClassVar, Generic, TypeVar

from ..errors import BrokerConnectionError, BrokerError, ClosedError
from ..log import broker_logger
from ._common import backoff, cancel_and_wait, report_failure, require_backoff, require_positive
from .base import Receiver

__all__ = ["Lifecycle", "State"]

_C = TypeVar("_C")


class State(enum.Enum):
    """Where a driver is in its life; only READY serves subscribe and publish."""

    IDLE = "idle"  # built, not connected yet
    CONNECTING = "connecting"  # connect() running
    READY = "ready"
    RECONNECTING = "reconnecting"  # the connection was lost; topics are kept
    CLOSED = "closed"


class Lifecycle(Generic[_C]):
    """State, reconnection, counters and delivery of a broker driver."""

    name: ClassVar[str]
    broker: ClassVar[str]  # the broker's name in messages: "NATS", "Redis", ...

    # The topics the streamer holds, in whatever mapping the driver keeps
    # them (a set, or a dict topic -> broker name).
    _topics: Collection[str]

    def __init__(self, reconnect_min: float, reconnect_max: float) -> None:
        require_positive(self.name, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
        require_backoff(self.name, reconnect_min, reconnect_max)
        self._reconnect_min = float(reconnect_min)
        self._reconnect_max = float(reconnect_max)
        self._state = State.IDLE
        self._receiver: Receiver | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready_event = asyncio.Event()  # set exactly while READY
        self._lost_event = asyncio.Event()  # wakes the default _serve
        self._lost_why = ""
        self._reconnects = 0
        self._published = 0
        self._received = 0
        self._failures = 0
        self._stray = 0  # broker messages for topics not held (dropped)

    # -- what every driver shows ---------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is State.READY

    @property
    def topics(self) -> frozenset[str]:
        """The topics this process holds a subscription for."""
        return frozenset(self._topics)

    def stats(self) -> dict[str, Any]:
        """The same keys for every driver: ``driver``, ``state``, ``ready``,
        ``subscriptions`` (topics held), ``reconnects`` (connections restored
        after a loss), ``published``, ``received`` (delivered to the
        receiver), ``failures`` (subscriptions lost and reported), ``stray``
        (broker messages for topics not held, dropped) and ``broker`` (a dict
        of the driver's own figures, often empty)."""
        return {
            "driver": self.name,
            "state": self._state.value,
            "ready": self.ready,
            "subscriptions": len(self._topics),
            "reconnects": self._reconnects,
            "published": self._published,
            "received": self._received,
            "failures": self._failures,
            "stray": self._stray,
            "broker": self._broker_stats(),
        }

    def _broker_stats(self) -> dict[str, Any]:
        return {}

    def _where(self) -> str:
        """The broker, for messages (a driver adds its address)."""
        return self.broker

    # -- connect and close ---------------------------------------------------

    async def connect(self, receiver: Receiver) -> None:
        self._check_open()
        if self._state is not State.IDLE:
            raise BrokerError(f"{self.name} driver is already connected")
        self._state = State.CONNECTING
        conn: Any = None
        opened = False
        try:
            await self._start()
            conn = await self._open()
            opened = True
            if self._state is State.CLOSED:
                raise ClosedError("driver is closed")
            self._receiver = receiver
            if not await self._restore(conn):
                raise BrokerConnectionError(f"connection to {self._where()} lost while connecting")
        except BaseException as exc:
            self._receiver = None
            if opened:
                await self._discard(conn)
            await self._stop()
            if self._state is State.CONNECTING:
                self._state = State.IDLE
            if isinstance(exc, BrokerError) or not isinstance(exc, Exception):
                raise
            raise BrokerConnectionError(f"cannot connect to {self._where()}: {exc!r}") from exc
        self._set_ready()
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(conn), name=f"gochan-{self.name}-supervisor"
        )
        broker_logger.info("%s: connected to %s", self.name, self._where())

    async def close(self) -> None:
        """Stop the supervisor, then release everything; idempotent."""
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSED
        self._ready_event.clear()
        supervisor, self._supervisor = self._supervisor, None
        await cancel_and_wait(supervisor)
        await self._close()
        await self._stop()
        self._receiver = None

    # -- the hooks -------------------------------------------------------------

    async def _start(self) -> None:
        """Make the clients that outlive a connection (before the first)."""

    async def _stop(self) -> None:
        """Release what :meth:`_start` made (after a failed connect, at close)."""

    async def _open(self) -> _C:
        raise NotImplementedError

    async def _restore(self, conn: _C) -> bool:
        raise NotImplementedError

    async def _serve(self, conn: _C) -> str | None:
        """Return once ``conn`` is lost, with why; by default once a driver
        callback has called :meth:`_lose`."""
        await self._lost_event.wait()
        return self._lost_why

    async def _discard(self, conn: _C) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    # -- the one reconnection loop --------------------------------------------

    async def _supervise(self, conn: _C) -> None:
        while True:
            try:
                why = await self._serve(conn) or "connection lost"
            except Exception:  # a bug must not leave the driver silently stuck
                broker_logger.exception("%s: supervisor error, starting afresh", self.name)
                why = "supervisor error"
            self._lose(why)
            await self._discard(conn)
            conn = await self._reconnect()

    async def _reconnect(self) -> _C:
        """Connect again and restore every held topic, until both succeed.

        Attempts start :func:`backoff` apart counted from the start of the
        previous one: an attempt that spent its timeout on a frozen broker is
        followed at once by the next (which finds the broker as soon as it
        resumes), one refused at once waits the whole backoff.
        """
        loop = asyncio.get_running_loop()
        attempt = 0
        started: float | None = None
        while True:
            delay = backoff(attempt, self._reconnect_min, self._reconnect_max)
            if started is not None:
                delay -= loop.time() - started
            await asyncio.sleep(max(0.0, delay))
            started = loop.time()
            attempt += 1
            try:
                conn = await self._open()
            except Exception as exc:
                broker_logger.info(
                    "%s: reconnection attempt %d failed: %s", self.name, attempt, exc
                )
                continue
            try:
                restored = await self._restore(conn)
            except Exception as exc:
                broker_logger.warning("%s: restore interrupted: %r", self.name, exc)
                restored = False
            if restored:
                self._set_ready()
                return conn
            await self._discard(conn)

    # -- state changes -----------------------------------------------------------

    def _set_ready(self) -> None:
        if self._state is State.CLOSED:
            return
        if self._state is State.RECONNECTING:
            self._reconnects += 1
            broker_logger.info(
                "%s: reconnected to %s, %d topics restored",
                self.name,
                self._where(),
                len(self._topics),
            )
        self._state = State.READY
        self._lost_event.clear()
        self._ready_event.set()

    def _lose(self, why: str) -> None:
        """The live connection is lost: not ready (publish and subscribe are
        refused from now on), and the supervisor reconnects."""
        if self._state is not State.READY:
            return
        self._state = State.RECONNECTING
        self._ready_event.clear()
        self._lost_why = why
        self._lost_event.set()
        broker_logger.warning(
            "%s: %s (%s); reconnecting (%d topics)",
            self.name,
            why,
            self._where(),
            len(self._topics),
        )

    def _check_open(self) -> None:
        if self._state is State.CLOSED:
            raise ClosedError("driver is closed")

    def _check_ready(self) -> None:
        """ClosedError when closed, BrokerConnectionError unless READY."""
        self._check_open()
        if self._state is not State.READY:
            raise BrokerConnectionError(f"not connected to {self._where()} ({self._state.value})")

    # -- delivery ------------------------------------------------------------------

    def _deliver(self, topic: str | None, data: bytes, event_id: str | None = None) -> None:
        """Hand a broker message to the receiver; one for a topic not held is
        dropped and counted, a receiver that fails is logged."""
        receiver = self._receiver
        if topic is None or receiver is None or topic not in self._topics:
            self._stray += 1
            return
        self._received += 1
        try:
            receiver.on_message(topic, data, event_id)
        except Exception:
            broker_logger.exception("%s: receiver failed on a message for %r", self.name, topic)

    def _report_failure(self, topic: str, message: str) -> None:
        """The subscription for ``topic`` is lost: count, log, tell the receiver."""
        self._failures += 1
        report_failure(self.name, self._receiver, topic, message, logging.ERROR)
