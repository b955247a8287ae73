"""ClusterNode: this process's part of a gochan cluster.

Client state (owner identity, topics, the nodes holding a stream for it)
lives in the cluster store as one record per client, written by
compare-and-set on its revision. Nodes reach each other through the store's
pub/sub: a heartbeat every second on the channel all nodes hear, and
``apply``/``ack`` messages in node inboxes.

- A stream opened here for a client made elsewhere reads its record, adds
  this node to its ``holders`` and takes its topics (:meth:`attach`).
- An update answered here is written to the record, applied on this node's
  streams, then sent to every other live holder, and answered once each has
  acknowledged it (:meth:`update`); past ``cluster_timeout`` it is an error.
- Expiry is cluster-wide: a holder touches the records it holds; the last
  holder to let go writes ``released_at`` and, ``client_ttl`` later, deletes
  the record unless someone took it meanwhile. A record nobody touches (its
  holders died) expires in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from ..client import TopicError
from ..config import Config
from ..errors import (
    BrokerError,
    ClientExistsError,
    ClusterError,
    ClusterTimeoutError,
    ConfigurationError,
    GochanError,
    LimitExceededError,
    UnknownClientError,
)
from ..locks import KeyedLocks
from ..log import broker_logger
from ..waiting import within
from .store import ALL_NODES, ClusterStore, key_of, valid_node_id

if TYPE_CHECKING:
    from ..client import Client
    from ..streamer import Streamer

__all__ = ["ClusterNode", "Record", "create_store", "default_node_id"]

HEARTBEAT_S = 1.0  # a node says it is alive this often
NODE_LEASE_S = 3.0  # and is taken for dead after this long unheard
LIVENESS_CHECK_S = 0.25  # an update waiting on acks looks for dead holders this often
CAS_ATTEMPTS = 32  # compare-and-set retries before a record is called contended
# Each held record is touched once per refresh period (client_ttl / 2 within
# these bounds), a slice of them every TOUCH_TICK_S, never all at once: with
# NATS a touch is a read and a write, and 4,000 of them in one burst held a
# node's loop for 1.5 s (bench/README.md, Cluster).
REFRESH_MIN_S, REFRESH_MAX_S = 1.0, 30.0
TOUCH_TICK_S = 1.0
CLOSE_WAIT_S = 2.0  # closing, a node lets go of its clients for this long at most
FORGET_NODE_S = 60.0  # a node unheard this long is dropped from last_seen


class Record(NamedTuple):
    """One client in the store."""

    identity: str | None
    topics: list[str]
    holders: list[str]  # nodes with a stream of it
    released_at: float | None  # epoch seconds the last holder let go, None while held

    def encode(self) -> bytes:
        return orjson.dumps(
            {"identity": self.identity, "topics": self.topics,
             "holders": self.holders, "released_at": self.released_at}
        )  # fmt: skip

    @classmethod
    def decode(cls, value: bytes) -> Record:
        data = orjson.loads(value)
        return cls(data["identity"], data["topics"], data["holders"], data.get("released_at"))


class _Waiter:
    __slots__ = ("errors", "pending", "woken")

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending
        self.errors: list[TopicError] = []
        self.woken = asyncio.Event()


def default_node_id() -> str:
    """The host's name, the process id and a few random characters."""
    host = "".join(c if c.isalnum() or c in "_-" else "-" for c in socket.gethostname())
    return f"{host[:40] or 'node'}-{os.getpid()}-{secrets.token_hex(2)}"


def create_store(config: Config) -> ClusterStore:
    """The store ``cluster_store`` names, or the broker the driver uses
    (NATS: JetStream key-value; Redis: keys)."""
    url = config.cluster_store
    if not url:
        options = config.driver_options
        if config.driver == "nats":
            url = str(options.get("url", "nats://127.0.0.1:4222"))
        elif config.driver == "redis":
            url = str(options.get("url", "redis://127.0.0.1:6379/0"))
        else:
            raise ConfigurationError(
                f"cluster: the {config.driver!r} driver has no store of its own: "
                "set cluster_store to a nats:// or redis:// URL"
            )
    scheme = url.partition("://")[0].lower()
    if scheme in ("nats", "tls"):
        from .nats_store import NatsStore

        return NatsStore(url, config.cluster_name)
    if scheme in ("redis", "rediss", "unix"):
        from .redis_store import RedisStore

        return RedisStore(url, config.cluster_name)
    raise ConfigurationError(f"cluster_store: expected a nats:// or redis:// URL, got {scheme!r}")


class ClusterNode:
    """The cluster as one node sees it."""

    def __init__(self, config: Config, store: ClusterStore | None = None) -> None:
        self.config = config
        self.node_id = config.node_id or default_node_id()
        if not valid_node_id(self.node_id):
            raise ConfigurationError(
                f"node_id {self.node_id!r}: 1..64 characters of A-Z a-z 0-9 _ -"
            )
        self.store = store or create_store(config)
        self.refresh_s = min(REFRESH_MAX_S, max(REFRESH_MIN_S, config.client_ttl / 2))
        # A record lives this long after its last write or touch.
        self.record_ttl = config.client_ttl + 2 * self.refresh_s
        self.holding: dict[str, int] = {}  # client id -> record revision applied here
        self.last_seen: dict[str, float] = {}  # node -> loop time of its heartbeat
        self._streamer: Streamer | None = None
        self._locks: KeyedLocks[str] = KeyedLocks()
        self._waiters: dict[int, _Waiter] = {}
        self._seq = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._started_at = 0.0
        self._to_touch: list[str] = []  # held clients not touched yet this period
        self.counters: dict[str, int] = dict.fromkeys(
            ("updates", "remote_applies", "ack_timeouts", "conflicts", "attaches",
             "expired", "store_errors"),
            0,
        )  # fmt: skip

    # -- lifecycle ---------------------------------------------------------

    async def start(self, streamer: Streamer) -> None:
        self._streamer = streamer
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        await self.store.connect(self.node_id, self._on_message, self.record_ttl)
        await self._heartbeat()
        self._tasks = [
            loop.create_task(self._every(HEARTBEAT_S, self._heartbeat), name="gochan-cluster-hb"),
            loop.create_task(self._every(TOUCH_TICK_S, self._refresh), name="gochan-cluster-ttl"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        # Releases under way (the streams just ended) finish; the rest stop.
        if self._background:
            await asyncio.wait(list(self._background), timeout=CLOSE_WAIT_S)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # What this node held is let go, so the records expire on time.
        with contextlib.suppress(BrokerError, asyncio.TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                for client_id in list(self.holding):
                    await self._let_go(client_id)
        await self.store.close()

    @property
    def ready(self) -> bool:
        """The store is reachable and this node hears its own heartbeat."""
        if not self.store.ready:
            return False
        seen = self.last_seen.get(self.node_id)
        return seen is not None and asyncio.get_running_loop().time() - seen < NODE_LEASE_S

    def live_nodes(self) -> list[str]:
        now = asyncio.get_running_loop().time()
        return sorted(n for n, seen in self.last_seen.items() if now - seen < NODE_LEASE_S)

    def alive(self, node: str) -> bool:
        if node == self.node_id:
            return True
        now = asyncio.get_running_loop().time()
        seen = self.last_seen.get(node)
        if seen is None:  # not heard yet: alive while this node is new itself
            return now - self._started_at < NODE_LEASE_S
        return now - seen < NODE_LEASE_S

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "node_id": self.node_id,
            "store": self.store.url,
            "store_up": self.store.ready,
            "nodes": len(self.live_nodes()) if self._tasks else 0,
            "held_clients": len(self.holding),
        }

    async def _every(self, period: float, job: Any) -> None:
        failing = False  # logged once per outage, not once per period
        while True:
            await asyncio.sleep(period)
            try:
                await job()
            except BrokerError as exc:
                self.counters["store_errors"] += 1
                if not failing:
                    broker_logger.warning("cluster: %s", exc)
                failing = True
                continue
            except Exception:
                broker_logger.exception("cluster: %s failed", getattr(job, "__name__", job))
                continue
            if failing:
                broker_logger.info("cluster: the store answers again")
            failing = False

    async def _heartbeat(self) -> None:
        await self.store.send(ALL_NODES, orjson.dumps({"op": "hb", "node": self.node_id}))
        now = asyncio.get_running_loop().time()
        for node, seen in list(self.last_seen.items()):
            if now - seen > FORGET_NODE_S:  # restarted nodes take new ids: forget old ones
                del self.last_seen[node]

    async def _refresh(self) -> None:
        """Touch the next slice of the held records: each about once per
        refresh period (a record written meanwhile is fresh anyway)."""
        if not self.holding:
            return
        if not self._to_touch:
            self._to_touch = list(self.holding)
        share = max(1, math.ceil(len(self.holding) * TOUCH_TICK_S / self.refresh_s))
        batch, self._to_touch = self._to_touch[-share:], self._to_touch[:-share]
        await self.store.touch([key_of(c) for c in batch if c in self.holding])

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def streamer(self) -> Streamer:
        if self._streamer is None:
            raise ClusterError("the cluster node is not started")
        return self._streamer

    # -- records -----------------------------------------------------------

    async def _read(self, client_id: str) -> tuple[Record, int] | None:
        entry = await self.store.get(key_of(client_id))
        if entry is None:
            return None
        try:
            return Record.decode(entry.value), entry.revision
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ClusterError(f"cluster store: unreadable record for a client: {exc}") from exc

    async def _write(self, client_id: str, record: Record, revision: int) -> int | None:
        written = await self.store.update(key_of(client_id), record.encode(), revision)
        if written is None:
            self.counters["conflicts"] += 1
        return written

    async def register(self, client: Client, *, holding: bool) -> None:
        """Put a client made here in the store; ``holding``: a stream of it
        is about to open here. ClientExistsError if the id is taken."""
        record = Record(
            client.identity,
            client.topics,
            [self.node_id] if holding else [],
            None if holding else time.time(),
        )
        revision = await self.store.create(key_of(client.id), record.encode())
        if revision is None:
            raise ClientExistsError(f"client id {client.id!r} is in use")
        client.shared = True
        if holding:
            self.holding[client.id] = revision

    async def lookup(self, client_id: str, identity: str | None) -> Record | None:
        """The client's record if ``identity`` owns it."""
        found = await self._read(client_id)
        if found is None or found[0].identity != identity:
            return None
        return found[0]

    async def attach(self, client_id: str, identity: str | None) -> Client | None:
        """A stream of ``client_id`` is about to open here: this node joins
        its holders and its local client takes the record's topics. None
        when no such client is owned by ``identity``."""
        streamer = self.streamer
        async with self._locks.hold(client_id):
            local = streamer.get_client(client_id)
            if client_id in self.holding and local is not None:
                return local if local.identity == identity else None
            for _ in range(CAS_ATTEMPTS):
                found = await self._read(client_id)
                if found is None or found[0].identity != identity:
                    return None
                record, revision = found
                if self.node_id in record.holders:
                    written: int | None = revision
                else:
                    holders = [h for h in record.holders if self.alive(h)] + [self.node_id]
                    written = await self._write(
                        client_id, record._replace(holders=holders, released_at=None), revision
                    )
                if written is not None:
                    break
            else:
                raise ClusterError(f"cluster store: client {client_id!r} is contended")
            self.counters["attaches"] += 1
            self.holding[client_id] = written
            try:
                if local is None or local.closed:
                    local = streamer.adopt_client(client_id, identity)  # max_clients
                await streamer.apply_topics(local, record.topics)
            except BaseException:
                # No stream will open here: this node is no holder after all.
                with contextlib.suppress(BrokerError):
                    await self._let_go(client_id)
                raise
            return local

    async def update(
        self, client_id: str, identity: str | None, add: list[str], remove: list[str]
    ) -> tuple[list[str], list[TopicError]]:
        """Add then remove topics of a client, cluster-wide: applied on every
        live holder's streams before it returns. Returns the topics and the
        per-topic failures. UnknownClientError when ``identity`` owns no
        such client; ClusterTimeoutError when a live holder did not answer
        within ``cluster_timeout``."""
        self.counters["updates"] += 1
        errors: list[TopicError] = []
        async with self._locks.hold(client_id):
            for _ in range(CAS_ATTEMPTS):
                found = await self._read(client_id)
                if found is None or found[0].identity != identity:
                    raise UnknownClientError(f"no client with id {client_id!r}")
                record, revision = found
                gone = set(remove)
                topics = [t for t in dict.fromkeys([*record.topics, *add]) if t not in gone]
                if topics == record.topics:
                    return topics, []
                if len(topics) > self.config.max_topics_per_client:
                    raise LimitExceededError(
                        f"a client may hold at most {self.config.max_topics_per_client} topics"
                    )
                written = await self._write(client_id, record._replace(topics=topics), revision)
                if written is not None:
                    break
            else:
                raise ClusterError(f"cluster store: client {client_id!r} is contended")
            local = self.streamer.get_client(client_id)
            if local is not None and client_id in self.holding:
                errors += await self.streamer.apply_topics(local, topics)
                self.holding[client_id] = max(self.holding.get(client_id, 0), written)
        others = [h for h in record.holders if h != self.node_id and self.alive(h)]
        if others:
            errors += await self._apply_on(others, client_id, written, topics)
        return topics, errors

    async def _apply_on(
        self, nodes: list[str], client_id: str, revision: int, topics: list[str]
    ) -> list[TopicError]:
        seq = next(self._seq)
        waiter = self._waiters[seq] = _Waiter(set(nodes))
        message = orjson.dumps(
            {"op": "apply", "client": client_id, "rev": revision, "topics": topics,
             "from": self.node_id, "seq": seq}
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.cluster_timeout
        try:
            await asyncio.gather(*(self.store.send(node, message) for node in nodes))
            while waiter.pending:
                left = deadline - loop.time()
                if left <= 0:
                    self.counters["ack_timeouts"] += 1
                    raise ClusterTimeoutError(
                        f"nodes {', '.join(sorted(waiter.pending))} did not apply the update "
                        f"within cluster_timeout={self.config.cluster_timeout:g}s"
                    )
                waiter.woken.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await within(waiter.woken.wait(), min(left, LIVENESS_CHECK_S))
                # A holder that died meanwhile has no streams left to change.
                waiter.pending = {n for n in waiter.pending if self.alive(n)}
        finally:
            del self._waiters[seq]
        return waiter.errors

    def release_soon(self, client: Client) -> None:
        """The client's last stream here ended: leave its holders (unless a
        stream opens again first)."""
        if client.id in self.holding:
            self._spawn(self._release(client.id))

    async def _release(self, client_id: str) -> None:
        async with self._locks.hold(client_id):
            local = self.streamer.get_client(client_id)
            if local is not None and local.streams:
                return  # a stream opened again meanwhile
            try:
                await self._let_go(client_id)
            except BrokerError as exc:
                self.counters["store_errors"] += 1
                broker_logger.warning("cluster: could not release a client: %s", exc)

    async def _let_go(self, client_id: str) -> None:
        self.holding.pop(client_id, None)
        for _ in range(CAS_ATTEMPTS):
            found = await self._read(client_id)
            if found is None or self.node_id not in found[0].holders:
                return
            record, revision = found
            holders = [h for h in record.holders if h != self.node_id]
            released = None if any(self.alive(h) for h in holders) else time.time()
            if await self._write(
                client_id, record._replace(holders=holders, released_at=released), revision
            ):
                return

    async def expire(self, client_id: str) -> None:
        """The client's local TTL ran out here: delete its record if no node
        has held it for ``client_ttl``."""
        try:
            async with self._locks.hold(client_id):
                found = await self._read(client_id)
                if found is None:
                    return
                record, revision = found
                if any(self.alive(h) for h in record.holders):
                    return
                released = record.released_at
                if released is not None and time.time() - released < self.config.client_ttl:
                    return  # another node let go of it later: its timer runs
                if await self.store.delete(key_of(client_id), revision):
                    self.counters["expired"] += 1
        except BrokerError as exc:
            self.counters["store_errors"] += 1
            broker_logger.warning("cluster: could not expire a client: %s", exc)

    async def remove(self, client_id: str) -> bool:
        """Delete the client cluster-wide: its streams on other nodes end."""
        found = await self._read(client_id)
        if found is None:
            return False
        record, revision = found
        message = orjson.dumps({"op": "close", "client": client_id, "from": self.node_id})
        for node in record.holders:
            if node != self.node_id and self.alive(node):
                await self.store.send(node, message)
        self.holding.pop(client_id, None)
        return await self.store.delete(key_of(client_id), revision)

    # -- messages from other nodes -----------------------------------------

    def _on_message(self, payload: bytes) -> None:
        try:
            message = orjson.loads(payload)
            op = message["op"]
            if op == "hb":
                self.last_seen[str(message["node"])] = asyncio.get_running_loop().time()
            elif op == "ack":
                waiter = self._waiters.get(int(message["seq"]))
                if waiter is not None:
                    waiter.pending.discard(str(message["node"]))
                    waiter.errors += [TopicError(*e) for e in message.get("errors", ())]
                    waiter.woken.set()
            elif op == "apply":
                self._spawn(self._apply_here(message))
            elif op == "close":
                self._spawn(self._close_here(str(message["client"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            broker_logger.warning("cluster: a malformed message on this node's channel")

    async def _apply_here(self, message: dict[str, Any]) -> None:
        client_id = str(message["client"])
        revision = int(message["rev"])
        errors: list[TopicError] = []
        self.counters["remote_applies"] += 1
        try:
            async with self._locks.hold(client_id):
                local = self.streamer.get_client(client_id)
                applied = self.holding.get(client_id)
                if local is not None and applied is not None and revision > applied:
                    errors = await self.streamer.apply_topics(local, list(message["topics"]))
                    self.holding[client_id] = revision
        except GochanError as exc:  # e.g. a topic this node's driver refuses
            errors = [TopicError(t, "cluster-apply-failure", str(exc)) for t in message["topics"]]
        finally:
            ack = {"op": "ack", "seq": message["seq"], "node": self.node_id,
                   "errors": [list(e) for e in errors]}  # fmt: skip
            try:
                await self.store.send(str(message["from"]), orjson.dumps(ack))
            except BrokerError as exc:
                broker_logger.warning("cluster: could not acknowledge an update: %s", exc)

    async def _close_here(self, client_id: str) -> None:
        self.holding.pop(client_id, None)
        try:
            await self.streamer.forget_client(client_id)
        except GochanError as exc:
            broker_logger.warning("cluster: could not end a removed client here: %s", exc)
