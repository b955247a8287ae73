"""Streamer: clients, topics, TTLs and the driver. No I/O of its own.

The streamer owns the fan-out hub (``gochan._fast.Hub``), keeps one driver
subscription per topic however many clients hold it, and runs the one tick
that sweeps heartbeats, client TTLs and whatever the server hooks in
(header and keep-alive timeouts).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ._fast import HEARTBEAT, Hub, Subscriber
from .auth import Authorize, JWTAuthorizer
from .client import (
    Client,
    TopicError,
    new_client_id,
    validate_client_id,
    validate_topic,
)
from .cluster import ClusterNode
from .config import DEFAULT_TICK_S, Config
from .drivers import Driver, MemDriver, create_driver, publish_each
from .errors import (
    BatchPublishError,
    BrokerError,
    ClientExistsError,
    ClosedError,
    GochanError,
    InterfaceError,
    InvalidTopicError,
    LimitExceededError,
    PeerLimitError,
    UnknownClientError,
)
from .frames import (
    CLIENT_CLOSED_FRAME,
    TOKEN_EXPIRED_FRAME,
    closing_frame,
    subscription_failure_frame,
)
from .locks import KeyedLocks
from .log import logger
from .ratelimit import RateLimit
from .replay import Replayer
from .stream import Stream
from .subscriptions import Subscriptions

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Streamer"]

_monotonic = time.monotonic  # one global lookup per message, not two

VALID_TOPICS_CACHED = 65_536  # topic names remembered as valid (then forgotten at once)
# Entries of streams ended before their token expired are dropped from the
# expiry heap once they outnumber the live ones by this many.
STALE_TOKEN_ENTRIES = 256

TickHook = Callable[[float], None]


class Streamer:
    """The embedding API: create clients, subscribe them, publish, serve.

    Use it as ``async with Streamer(config) as streamer:`` or call
    :meth:`start` and :meth:`close` yourself.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        driver: Driver | None = None,
        authorize: Authorize | None = None,
        cluster: ClusterNode | None = None,
    ) -> None:
        """``authorize``: the hook every front end runs before ``/events``,
        ``/update_subscriptions`` and ``/publish`` (see :mod:`gochan.auth`);
        by default the JWT authorizer the config's ``jwt_*`` settings ask
        for, or none (authorization off). ``cluster``: this node's part of a
        cluster (see :mod:`gochan.cluster`); by default the one the config's
        ``cluster`` setting asks for, or none."""
        self.config = config or Config()
        self.driver: Driver = driver or create_driver(
            self.config.driver, self.config.driver_options
        )
        self.authorize: Authorize | None = (
            authorize if authorize is not None else JWTAuthorizer.from_config(self.config)
        )
        self.cluster: ClusterNode | None = cluster
        if cluster is None and self.config.cluster:
            self.cluster = ClusterNode(self.config)
        self.publish_buckets = RateLimit(
            self.config.publish_rate_per_identity, self.config.publish_burst
        )
        self._identity_streams: dict[str, int] = {}  # identity -> its open streams
        # Streams whose token expires: a heap of (exp, n, stream), and the
        # ones still open (a stream that ended first leaves a stale entry).
        self._token_expiry: list[tuple[float, int, Stream]] = []
        self._token_streams: set[Stream] = set()
        self._hub: Hub | None = None
        self._clients: dict[str, Client] = {}
        self._peer_clients: dict[str, int] = {}  # peer address -> clients it made
        # Updates of one client run one at a time: a lock per client being
        # updated, none kept for the others.
        self._update_locks: KeyedLocks[Client] = KeyedLocks()
        self._peer_client_limit = self.config.peer_client_limit
        # Clients in the order their TTL started. Every TTL is client_ttl
        # long, so this is also deadline order: a queue, one pointer per entry,
        # not a heap of tuples. A client re-armed before its deadline has
        # several entries; only its last one (Client.armed says which) counts.
        self._expiry: collections.deque[Client] = collections.deque()
        self._expiry_n = itertools.count()
        self._tick_hooks: list[TickHook] = []
        self._tick_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._servers: list[Server] = []
        # Put before the random part of generated ids: a worker's tag
        # (``w1.``) under --workers, so any worker can tell whose client it is.
        self.client_id_prefix = ""
        self._next_heartbeat = 0.0
        self._jitter = random.Random()  # shutdown retry delays: spread, not secret
        # Topic names already validated, each mapped to one shared instance:
        # a client's topics are that instance, not the copy parsed from its
        # request (10 topics x 10,000 connections is 5.6 MB of copies).
        self._valid_topics: dict[str, str] = {}
        driver = self.driver
        self._started = False
        self._closed = False
        self.counters: dict[str, int] = dict.fromkeys(
            ("messages_in", "published", "clients_created", "clients_expired",
             "subscription_failures", "replay_hits", "replay_misses"),
            0,
        )  # fmt: skip
        self.replayer = Replayer(self.config, driver, self.counters, self._join, self._spawn)
        self.history = self.replayer.history  # what is kept for replay in memory
        self.subscriptions = Subscriptions(
            driver, self.history, sees_every_publish=isinstance(driver, MemDriver)
        )

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Connect the driver and start the tick. Idempotent."""
        if self._closed:
            raise ClosedError("streamer is closed")
        if self._started:
            return
        loop = asyncio.get_running_loop()
        self._hub = Hub(
            loop,
            self.config.max_pending_bytes,
            max_delay=self.config.max_flush_delay,
            send_buffer=self.config.stream_send_buffer_bytes,
        )
        await self.driver.connect(self)
        if self.cluster is not None:
            try:
                await self.cluster.start(self)
            except BaseException:
                await self.driver.close()
                raise
        self._started = True
        self._next_heartbeat = time.monotonic() + self.config.heartbeat
        self._tick_task = loop.create_task(self._tick_loop(), name="gochan-tick")

    async def close(self) -> None:
        """Stop servers, end every stream with ``Client closed``, close the driver."""
        if self._closed:
            return
        self._closed = True
        for server in list(self._servers):
            await server.shutdown()
        self.end_streams()
        if self._tick_task is not None:
            self._tick_task.cancel()
            await asyncio.gather(self._tick_task, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._clients.clear()
        self._peer_clients.clear()
        self._token_expiry.clear()
        self._token_streams.clear()
        if self.cluster is not None:
            await self.cluster.close()
        await self.driver.close()

    async def __aenter__(self) -> Streamer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            raise InterfaceError("the streamer is not started: await streamer.start()")
        return self._hub

    @property
    def started(self) -> bool:
        return self._started and not self._closed

    @property
    def ready(self) -> bool:
        return self.started and self.driver.ready and (self.cluster is None or self.cluster.ready)

    def add_tick_hook(self, hook: TickHook) -> None:
        """Call ``hook(now)`` on every tick (``time.monotonic()`` clock)."""
        self._tick_hooks.append(hook)

    def remove_tick_hook(self, hook: TickHook) -> None:
        if hook in self._tick_hooks:
            self._tick_hooks.remove(hook)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(DEFAULT_TICK_S)
            try:
                self.tick(time.monotonic())
            except Exception:
                logger.exception("tick failed")

    def tick(self, now: float) -> None:
        """One sweep: heartbeats when due, expired clients, server hooks."""
        if now >= self._next_heartbeat:
            self.hub.heartbeat(HEARTBEAT)
            self._next_heartbeat = now + self.config.heartbeat
        expiry = self._expiry
        while expiry:
            client = expiry.popleft()
            client.armed -= 1
            if client.armed or client.expires_at is None or client.closed:
                continue  # it was armed again later, has a stream, or is gone
            if client.expires_at > now:
                expiry.appendleft(client)  # its last entry, and not due: none after it is
                client.armed += 1
                break
            if self._clients.get(client.id) is client:
                # Gone from the table now, not when the task runs: nobody can
                # attach to it in between.
                del self._clients[client.id]
                self.counters["clients_expired"] += 1
                self._spawn(self._expire(client))
        if self._token_expiry and self._token_expiry[0][0] <= time.time():
            self._end_expired_tokens(time.time())
        self.publish_buckets.forget_idle(now)
        self.history.expire(now)
        self.hub.sweep(now)  # slow consumers being cut
        for hook in self._tick_hooks:
            hook(now)

    async def _expire(self, client: Client) -> None:
        await self._end_client(client)
        if self.cluster is not None and client.shared:
            await self.cluster.expire(client.id)  # and cluster-wide, if no node holds it

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- clients -----------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started or self._closed:
            raise ClosedError("streamer is not running")

    def _add_client(self, client_id: str, peer: str = "", identity: str | None = None) -> Client:
        self._check_open()
        if len(self._clients) >= self.config.max_clients:
            raise LimitExceededError(f"too many clients (max_clients={self.config.max_clients})")
        if peer:
            made = self._peer_clients.get(peer, 0)
            if made >= self._peer_client_limit:
                raise PeerLimitError(
                    f"too many clients from one address "
                    f"(max_clients_per_peer={self.config.peer_client_limit})"
                )
            self._peer_clients[peer] = made + 1
        client = Client(client_id, peer, identity)
        self._clients[client_id] = client
        self.counters["clients_created"] += 1
        self._arm_expiry(client)
        return client

    def _arm_expiry(self, client: Client) -> None:
        client.expires_at = time.monotonic() + self.config.client_ttl
        client.armed += 1
        self._expiry.append(client)

    def create_client(self, peer: str = "", identity: str | None = None) -> Client:
        """A new client with a random id and no topics (no broker I/O).
        ``peer``: the address it is made for, counted against
        ``max_clients_per_peer`` until the client is removed. ``identity``:
        who made it (a token's ``sub``); only that identity may use it."""
        return self._add_client(self.client_id_prefix + new_client_id(), peer, identity)

    async def new_client(
        self, topics: Iterable[str] = (), *, identity: str | None = None
    ) -> Client:
        """A new client with a random unguessable id, subscribed to ``topics``.
        ``identity``: the token ``sub`` that may use it over HTTP when
        authorization is on (None: only requests without one)."""
        client = self.create_client(identity=identity)
        await self._subscribe_new(client, topics)
        await self._share(client)
        return client

    async def new_custom_client(
        self, client_id: str, topics: Iterable[str] = (), *, identity: str | None = None
    ) -> Client:
        """A new client with the given id; an id in use raises ClientExistsError.
        ``identity`` as for :meth:`new_client`."""
        validate_client_id(client_id)
        if client_id in self._clients:
            raise ClientExistsError(f"client id {client_id!r} is in use")
        client = self._add_client(client_id, identity=identity)
        await self._subscribe_new(client, topics)
        await self._share(client)
        return client

    async def _share(self, client: Client) -> None:
        if self.cluster is None:
            return
        try:
            await self.cluster.register(client, holding=False)
        except BaseException:
            await self._end_client(client)
            raise

    async def register_client(self, client: Client) -> None:
        """In a cluster, put a client made here for a stream about to open
        here in the cluster store (nothing without a cluster)."""
        if self.cluster is not None:
            await self.cluster.register(client, holding=True)

    async def attach_client(self, client_id: str, identity: str | None) -> Client | None:
        """The client a stream about to open is for, if ``identity`` owns
        it; in a cluster, wherever it was made (it is taken from the store,
        with its topics)."""
        if self.cluster is not None:
            return await self.cluster.attach(client_id, identity)
        client = self._clients.get(client_id)
        return client if client is not None and client.identity == identity else None

    def adopt_client(self, client_id: str, identity: str | None) -> Client:
        """A local client for one the cluster store has (no topics yet)."""
        client = self._add_client(client_id, identity=identity)
        client.shared = True
        return client

    async def apply_topics(self, client: Client, topics: list[str]) -> list[TopicError]:
        """Make ``client``'s topics here exactly ``topics`` (the cluster
        store's word), subscribing and unsubscribing as needed."""
        wanted = self.check_topics(topics)
        async with self._update_locks.hold(client):
            keep = set(wanted)
            add = client.new_topics(wanted)
            remove = [t for t in client.topics if t not in keep]
            if not add and not remove:
                return []
            return await self._apply(client, add, remove)

    async def forget_client(self, client_id: str) -> None:
        """End a client here only (another node removed it cluster-wide)."""
        found = self._clients.get(client_id)
        if found is not None:
            await self._end_client(found)

    async def _subscribe_new(self, client: Client, topics: Iterable[str]) -> None:
        try:
            topics = self.check_topics(topics)  # a bare str is refused here too
        except BaseException:
            self._forget_client(client)
            raise
        if not topics:
            return
        try:
            errors = await self.add_checked_topics(client, topics)
        except BaseException:
            await self.remove_client(client.id)
            raise
        if errors:
            raise BrokerError("; ".join(f"{e.topic}: {e.message}" for e in errors))

    def get_client(self, client_id: str) -> Client | None:
        return self._clients.get(client_id)

    def _client(self, client: Client | str) -> Client:
        if isinstance(client, Client):
            if client.closed:
                raise UnknownClientError(f"client {client.id!r} was removed")
            return client
        found = self._clients.get(client)
        if found is None:
            raise UnknownClientError(f"no client with id {client!r}")
        return found

    def count_clients(self) -> int:
        return len(self._clients)

    def client_topics(self, client: Client | str) -> list[str]:
        return self._client(client).topics

    async def remove_client(self, client: Client | str) -> bool:
        """End the client's streams with ``Client closed`` and drop its topics
        (the original gochan's ``Client.Close``); in a cluster, on every node."""
        try:
            found = self._client(client)
        except UnknownClientError:
            if self.cluster is not None and isinstance(client, str):
                return await self.cluster.remove(client)
            return False
        cluster = self.cluster if found.shared else None
        await self._end_client(found)
        if cluster is not None:
            await cluster.remove(found.id)
        return True

    async def _end_client(self, found: Client) -> None:
        if found.closed:
            return  # ended already (its peer share is not given back twice)
        self._forget_client(found)
        for sub in found._end_streams():
            self.hub.finish(sub, CLIENT_CLOSED_FRAME)
        for topic in found.topics:
            found._remove_topic(topic)
            await self.subscriptions.release(topic)

    def discard_client(self, client: Client) -> None:
        """Remove a client that holds no topic and no stream, without
        awaiting: what a refused connect made is not left behind."""
        if client.topic_count or client.streams:
            raise InterfaceError("discard_client is for clients without topics or streams")
        if not client.closed:
            self._forget_client(client)

    def _forget_client(self, client: Client) -> None:
        client.closed = True
        self._clients.pop(client.id, None)
        if client.peer:
            made = self._peer_clients.get(client.peer, 0) - 1
            if made > 0:
                self._peer_clients[client.peer] = made
            else:
                self._peer_clients.pop(client.peer, None)

    # -- subscriptions -----------------------------------------------------

    def check_topics(self, topics: Iterable[object]) -> list[str]:
        """Validate topics against the protocol and the driver; raise on the
        first bad one. ``topics`` is a collection of names: a bare ``str``
        is refused (it would be read as its characters)."""
        if isinstance(topics, (str, bytes)):
            raise InvalidTopicError(
                repr(topics)[:40], "topics must be a list of names, not one string: use [topic]"
            )
        known = self._valid_topics
        listed: list[Any] | tuple[Any, ...] = (
            topics if isinstance(topics, (list, tuple)) else list(topics)
        )
        try:
            # All seen before, the usual case: no None among them. A new name
            # (None) or a non-str (a TypeError if unhashable) goes through the
            # checks below. No KeyError: raising one costs more than the
            # lookups (a connect on a new per-user topic).
            found = list(map(known.get, listed))
            if None not in found:
                return found  # type: ignore[return-value]
        except TypeError:
            pass
        checked: list[str] = []
        for topic in listed:
            if isinstance(topic, str):
                shared = known.get(topic)
                if shared is not None:
                    checked.append(shared)  # hot topics are checked once, not per message
                    continue
            valid = validate_topic(topic)
            self.driver.check_topic(valid)
            if len(known) >= VALID_TOPICS_CACHED:
                known.clear()
            known[valid] = valid
            checked.append(valid)
        return checked

    async def subscribe(self, client: Client | str, topics: Iterable[str]) -> list[TopicError]:
        return await self.update_subscriptions(client, add=topics)

    async def unsubscribe(self, client: Client | str, topics: Iterable[str]) -> list[TopicError]:
        return await self.update_subscriptions(client, remove=topics)

    async def update_subscriptions(
        self,
        client: Client | str,
        add: Iterable[str] = (),
        remove: Iterable[str] = (),
    ) -> list[TopicError]:
        """Add then remove topics, in order. Invalid topics or a passed topic
        limit raise before anything changes; broker failures are returned per
        topic (and streamed to the client as subscription-failure frames)."""
        found = self._client(client)
        add_list = self.check_topics(add)
        remove_list = self.check_topics(remove)
        if found.shared and self.cluster is not None:
            return (await self.cluster.update(found.id, found.identity, add_list, remove_list))[1]
        final = (set(found.topics) | set(add_list)) - set(remove_list)
        if len(final) > self.config.max_topics_per_client:
            raise LimitExceededError(
                f"a client may hold at most {self.config.max_topics_per_client} topics"
            )
        async with self._update_locks.hold(found):
            return await self._apply(found, add_list, remove_list)

    def add_held_topics(self, client: Client, topics: Iterable[str]) -> bool:
        """Subscribe ``client`` to ``topics`` without awaiting, when the driver
        already holds every one of them or subscribes without a round trip
        (in memory): a connect storm needs no task per connection then.
        False, with nothing changed, when one must wait for the broker (or
        an update of this client is under way): use
        :meth:`update_subscriptions` then. Topics must be checked already."""
        if client.closed or self._update_locks.busy(client):
            return False
        new = client.new_topics(topics)
        if client.topic_count + len(new) > self.config.max_topics_per_client:
            raise LimitExceededError(
                f"a client may hold at most {self.config.max_topics_per_client} topics"
            )
        if not self.subscriptions.hold_now(new):
            return False
        client._add_topics(new)
        for stream in client.streams:
            if stream.replay is None:  # a replaying stream joins when it is done
                self.hub.subscribe_all(stream, new)
        return True

    async def add_checked_topics(self, client: Client, topics: list[str]) -> list[TopicError]:
        """:meth:`update_subscriptions` with ``add=topics`` and nothing to
        remove, for ``topics`` that :meth:`check_topics` returned (not
        checked again): what a connect awaits when :meth:`add_held_topics`
        could not subscribe without the broker."""
        if client.topic_count + len(client.new_topics(topics)) > self.config.max_topics_per_client:
            raise LimitExceededError(
                f"a client may hold at most {self.config.max_topics_per_client} topics"
            )
        async with self._update_locks.hold(client):
            return await self._apply(client, topics, [])

    async def _apply(self, client: Client, add: list[str], remove: list[str]) -> list[TopicError]:
        errors: list[TopicError] = []
        hub = self.hub
        for topic in add:
            try:
                if client.has_topic(topic):
                    if topic not in self.subscriptions.subscribed:
                        # The broker lost it (on_subscription_failure): adding
                        # it again is how a client asks for another try.
                        await self.subscriptions.reconcile(topic)
                    continue
                await self.subscriptions.acquire(topic)
            except BrokerError as exc:
                self.counters["subscription_failures"] += 1
                errors.append(TopicError(topic, "subscription-failure", str(exc)))
                frame = subscription_failure_frame(topic, str(exc))
                for sub in client.streams:
                    sub.send(frame)
                continue
            if client.closed:  # removed while we waited on the broker
                await self.subscriptions.release(topic)
                raise UnknownClientError(f"client {client.id!r} was removed")
            client._add_topic(topic)
            for stream in client.streams:
                if stream.replay is None:  # a replaying stream joins when it is done
                    hub.subscribe(stream, topic)
        for topic in remove:
            if client._remove_topic(topic):
                for sub in client.streams:
                    hub.unsubscribe(sub, topic)
                await self.subscriptions.release(topic)
        return errors

    # -- streams (used by the server) --------------------------------------

    def open_stream(
        self,
        client: Client,
        transport: asyncio.WriteTransport,
        head: bytes,
        last_event_id: str = "",
        front_end: object = None,
        token_exp: float | None = None,
    ) -> Stream:
        """A new stream of ``client`` on ``transport``: ``head`` (the HTTP head
        and first frames) first in its queue, then what it missed after
        ``last_event_id`` (see :mod:`gochan.replay`), then live frames.
        ``front_end``: who opened it, so that :meth:`end_streams` ends only
        its streams when it stops. ``token_exp``: when the token it was
        opened with expires (seconds since the epoch): then it ends with
        ``token-expired`` and ``Client closed``."""
        stream = Stream(self.hub, transport, client, front_end)
        stream.send_first(head)
        client._add_stream(stream)
        client.expires_at = None
        identity = client.identity
        if identity is not None:
            self._identity_streams[identity] = self._identity_streams.get(identity, 0) + 1
        if token_exp is not None:
            heapq.heappush(self._token_expiry, (token_exp, next(self._expiry_n), stream))
            self._token_streams.add(stream)
        if last_event_id:
            self.replayer.start(stream, last_event_id)
        else:
            self._join(stream)
        return stream

    def _join(self, stream: Stream) -> None:
        self.hub.subscribe_all(stream, stream.client.topics)

    def detach(self, stream: Subscriber) -> None:
        """The stream's connection is gone; the TTL starts with the last one."""
        if isinstance(stream, Stream):
            self.replayer.forget(stream)
        self.hub.close(stream)
        client = stream.owner
        if (
            isinstance(client, Client)
            and isinstance(stream, Stream)
            and client._remove_stream(stream)
        ):
            identity = client.identity
            if identity is not None:
                left = self._identity_streams.get(identity, 0) - 1
                if left > 0:
                    self._identity_streams[identity] = left
                else:
                    self._identity_streams.pop(identity, None)
            if not client.streams and not client.closed and not self._closed:
                self._arm_expiry(client)
                if self.cluster is not None and client.shared:
                    self.cluster.release_soon(client)
        if self._token_streams and stream in self._token_streams:
            self._token_streams.discard(stream)
            heap = self._token_expiry
            if len(heap) > 2 * len(self._token_streams) + STALE_TOKEN_ENTRIES:
                live = self._token_streams
                self._token_expiry = [entry for entry in heap if entry[2] in live]
                heapq.heapify(self._token_expiry)

    def identity_streams(self, identity: str) -> int:
        """Open streams of clients made by ``identity``."""
        return self._identity_streams.get(identity, 0)

    def _end_expired_tokens(self, wall: float) -> None:
        """End the streams whose token has expired by ``wall`` (epoch seconds):
        ``token-expired``, then ``Client closed``, then the connection closes."""
        heap = self._token_expiry
        while heap and heap[0][0] <= wall:
            stream = heapq.heappop(heap)[2]
            if stream in self._token_streams:
                self.hub.finish(stream, TOKEN_EXPIRED_FRAME + CLIENT_CLOSED_FRAME)
                self.detach(stream)

    def end_streams(self, front_end: object = None) -> list[asyncio.WriteTransport]:
        """End the streams ``front_end`` opened (every stream when None) at
        once (shutdown), each with its own :meth:`closing_frame`: a
        backlogged stream gets its backlog first. Returns the transports,
        which close once their peers have taken the rest. (The server's
        shutdown spreads the endings over its grace period instead.)"""
        transports: list[asyncio.WriteTransport] = []
        for stream in self.streams_of(front_end):
            transports.append(stream.transport)
            self.end_stream(stream, self.closing_frame())
        return transports

    def streams_of(self, front_end: object = None) -> list[Subscriber]:
        """The open streams ``front_end`` opened (every one when None)."""
        if self._hub is None:
            return []
        streams = self._hub.open_subscribers()
        if front_end is None:
            return streams
        return [s for s in streams if getattr(s, "front_end", None) is front_end]

    def end_stream(self, stream: Subscriber, frame: bytes = CLIENT_CLOSED_FRAME) -> None:
        """Send what ``stream`` has queued, then ``frame``, and close it."""
        self.hub.finish(stream, frame)
        self.detach(stream)

    def closing_frame(self) -> bytes:
        """The shutdown's last frames (:func:`gochan.frames.closing_frame`):
        ``{"shutdown":{"retry_ms":N}}``, then ``Client closed`` with
        ``retry: N``, N drawn uniformly from [shutdown_retry_min,
        shutdown_retry_max], one draw per stream, so a fleet of browsers
        (gochan.js reads N, EventSource the ``retry:``) does not reconnect in
        the same second."""
        config = self.config
        delay = self._jitter.uniform(config.shutdown_retry_min, config.shutdown_retry_max)
        return closing_frame(round(delay * 1000))

    # -- messages ----------------------------------------------------------

    def on_message(self, topic: str, data: bytes, event_id: str | None) -> str:
        """Driver callback: number the message (unless the broker did), encode
        it once, keep it for replay and queue it on every stream of ``topic``."""
        received = _monotonic()  # for the publish-to-write histogram
        self.counters["messages_in"] += 1
        # Per message: the dict lookup itself, not a method call around it.
        held = topic in self.subscriptions.refs
        event_id, frame = self.replayer.frame(topic, data, event_id, held)
        hub = self._hub
        if hub is not None:
            hub.publish(topic, frame, received)
        return event_id

    def on_subscription_failure(self, topic: str, message: str) -> None:
        """Driver callback: the broker lost ``topic``; tell its clients. The
        topic stays theirs; the next add of it (by any client) subscribes again."""
        self.counters["subscription_failures"] += 1
        self.subscriptions.lost(topic)
        frame = subscription_failure_frame(topic, message)
        for client in self._clients.values():
            if client.has_topic(topic):
                for sub in client.streams:
                    sub.send(frame)

    async def publish(self, topic: str, data: bytes | str) -> str | None:
        """Publish through the driver (so every node gets it); returns the
        event id when the driver knows it at publish time."""
        self._check_open()
        self.check_topics((topic,))
        body = data.encode() if isinstance(data, str) else bytes(data)
        self.counters["published"] += 1
        self._note_unheld(topic)
        return await self.driver.publish(topic, body)

    def publish_nowait(self, topic: str, data: bytes) -> str | None:
        """Publish without awaiting, for drivers that can (the in-memory one).
        Raises InterfaceError for drivers that need a round trip, and
        InvalidTopicError for a topic that is not valid, before anything
        else (the server's publish fast path relies on that)."""
        publish = getattr(self.driver, "publish_nowait", None)
        if publish is None:
            raise InterfaceError(f"driver {self.driver.name!r} cannot publish without awaiting")
        self.check_topics((topic,))
        self._check_open()
        self.counters["published"] += 1
        self._note_unheld(topic)
        event_id: str | None = publish(topic, data)
        return event_id

    async def publish_many(self, messages: Sequence[tuple[str, bytes | str]]) -> list[str | None]:
        """Publish a batch of (topic, data) in order, through the driver's own
        batching where it has one; returns one event id per message (as
        :meth:`publish`). Every topic is checked before anything is sent. A
        failure partway raises :class:`~gochan.errors.BatchPublishError`
        with the ids of the messages published."""
        if self.can_publish_many_nowait:
            return self.publish_many_nowait(messages)
        self._check_open()
        batch = self._batch(messages)
        publish = getattr(self.driver, "publish_many", None)
        try:
            if publish is not None:
                ids: list[str | None] = await publish(batch)
            else:
                ids = await publish_each(self.driver, batch)
        except BatchPublishError as exc:
            self._published(batch, len(exc.ids))
            raise
        except GochanError as exc:  # refused before anything was sent (not connected)
            raise BatchPublishError([], len(batch), exc) from exc
        self._published(batch, len(ids))
        return ids

    def publish_many_nowait(self, messages: Sequence[tuple[str, bytes | str]]) -> list[str | None]:
        """:meth:`publish_many` without awaiting, for drivers that can (the
        in-memory one); the whole batch goes out in one pass of the loop."""
        publish = getattr(self.driver, "publish_many_nowait", None)
        if publish is None:
            raise InterfaceError(f"driver {self.driver.name!r} cannot publish without awaiting")
        self._check_open()
        batch = self._batch(messages)
        try:
            ids: list[str | None] = publish(batch)
        except BatchPublishError as exc:
            self._published(batch, len(exc.ids))
            raise
        except GochanError as exc:
            raise BatchPublishError([], len(batch), exc) from exc
        self._published(batch, len(ids))
        return ids

    def _published(self, batch: list[tuple[str, bytes]], count: int) -> None:
        """Count the first ``count`` messages of ``batch`` as published. A
        gap is marked after the batch, not at each message: later than the
        message it stands for, so a replay is at worst refused (recovered:
        false) where it could have been served, never the reverse."""
        self.counters["published"] += count
        if self.subscriptions.sees_every_publish:
            for topic, _ in batch[:count]:
                self._note_unheld(topic)

    def _batch(self, messages: Sequence[tuple[str, bytes | str]]) -> list[tuple[str, bytes]]:
        """``messages`` checked (every topic) and with bytes for data."""
        topics = self.check_topics([topic for topic, _ in messages])
        return [
            (topic, data.encode() if isinstance(data, str) else bytes(data))
            for topic, (_, data) in zip(topics, messages, strict=True)
        ]

    def _note_unheld(self, topic: str) -> None:
        subs = self.subscriptions
        if subs.sees_every_publish and not subs.held(topic):
            self.history.mark_gap(topic)  # it goes nowhere: nobody holds the topic

    @property
    def can_publish_nowait(self) -> bool:
        return hasattr(self.driver, "publish_nowait")

    @property
    def can_publish_many_nowait(self) -> bool:
        return hasattr(self.driver, "publish_many_nowait")

    # -- serving -----------------------------------------------------------

    # The HTTP front end serve() and protocol_factory() build. gochan.server
    # sets it when it is imported (the package imports it), so the core does
    # not depend on the server: the server depends on the core.
    server_class: ClassVar[type[Server] | None] = None

    def _server(self, **options: Any) -> Server:
        cls = type(self).server_class
        if cls is None:
            raise InterfaceError("no HTTP front end: import gochan.server")
        server = cls(self, self.config, **options)
        self._servers.append(server)
        return server

    async def serve(self, host: str | None = None, port: int | None = None) -> Server:
        """Listen on ``host:port`` (defaults from the config) and return the server."""
        await self.start()
        server = self._server()
        await server.listen(host or self.config.host, self.config.port if port is None else port)
        return server

    def protocol_factory(self, *, loopback_only: bool = False) -> Callable[[], asyncio.Protocol]:
        """A factory for ``loop.create_server`` in the caller's own program.
        The streamer must be started first. It cannot see the addresses the
        caller binds: pass ``loopback_only=True`` to promise they are all
        loopback, which allows keyless publishing from loopback peers when
        no publish_key is set (otherwise publishing needs the key)."""
        return self._server(loopback_only=loopback_only).protocol_factory

    def _forget_server(self, server: Server) -> None:
        if server in self._servers:
            self._servers.remove(server)

    def stats(self) -> dict[str, Any]:
        hub = self._hub.stats() if self._hub is not None else {}
        return {
            **self.counters,
            **hub,
            "clients": len(self._clients),
            "driver_subscriptions": len(self.subscriptions.subscribed),
            "history_messages": len(self.history),
            "history_bytes": self.history.bytes,
            "driver": self.driver.stats(),
            "cluster": self.cluster.stats() if self.cluster is not None else None,
        }
