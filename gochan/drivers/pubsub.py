"""The Google Cloud Pub/Sub driver (gcloud-aio-pubsub, REST over aiohttp).

Each gochan process creates its own Pub/Sub subscription per topic it holds:
``subscribe(topic)`` creates ``<prefix>gochan-<process token>-<n>`` on the
topic (creating the topic first when it is missing and ``create_topics`` is
on) and starts a pull loop on it; ``unsubscribe`` stops the loop and deletes
the subscription. A Pub/Sub topic copies every message to every subscription,
so every process holding a topic receives all of its messages (fan-out, never
competing consumers). ``close`` deletes every subscription the process made;
topics are left alone. Subscriptions carry an expiration policy (one day
without pulls, Pub/Sub's minimum), so those of a process that died without
``close`` disappear by themselves.

The asyncio-native REST client was preferred over google-cloud-pubsub, whose
streaming pull runs callbacks on its own threads; one long-polling ``pull``
per held topic is the cost (all over one aiohttp session, without a
connection limit).

Topic mapping: the Pub/Sub topic id is ``prefix + quote(topic)``, where every
character outside ``[A-Za-z0-9-_.~+]`` (``%`` included) is replaced by the
``%XX`` escapes of its UTF-8 bytes, reversibly (:func:`topic_id` and
:func:`gochan_topic`); topics made only of those characters keep their name.
:meth:`check_topic` refuses topics whose id would not start with a letter, be
shorter than 3 or longer than 255 characters, or start with ``goog``.

Bodies are relayed as the message data, byte for byte (Pub/Sub carries bytes);
attributes and ordering keys are ignored. Pub/Sub refuses a message with
neither data nor attributes, so an empty body is published with the attribute
``gochan-empty=1``. Event ids are Pub/Sub message ids; ``publish`` returns
the id of the message it published. Pub/Sub does not keep order without
ordering keys, and delivers at least once (a message whose acknowledgement
was lost comes again after the 10 s ack deadline).

Outages: a failed pull makes the driver not :attr:`ready`; the shared
reconnection loop probes the service with jittered exponential backoff,
then checks every subscription and recreates the missing ones (an emulator
restart forgets everything), counting one reconnect; a topic whose
subscription cannot be recreated is reported with
``on_subscription_failure``. Messages published while a subscription did not
exist are lost; those retained by a surviving subscription are delivered.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import ClassVar, TypeVar
from urllib.parse import quote, unquote

import aiohttp
from gcloud.aio.pubsub import PublisherClient, PubsubMessage, SubscriberClient

from ..errors import (
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)
from ..log import broker_logger
from ._common import bounded, cancel_and_wait, require_positive
from ._lifecycle import Lifecycle

__all__ = ["PubSubDriver", "gochan_topic", "topic_id"]

DEFAULT_PROJECT = "gochan"
DEFAULT_PREFIX = ""
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_PULL_TIMEOUT_S = 30  # one long-polling pull; an empty one just repeats
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 10.0
ACK_DEADLINE_S = 10  # Pub/Sub's minimum: redeliver soon what was not acked
RETENTION = "600s"  # Pub/Sub's minimum; a live relay has no use for more
EXPIRATION_TTL = "86400s"  # Pub/Sub's minimum: orphans of dead processes go away
PULL_BATCH = 100
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409

ID_MIN_CHARS = 3
ID_MAX_CHARS = 255
PROCESS_TOKEN_BYTES = 6
_SAFE = frozenset(string.ascii_letters + string.digits + "-_.~+")
EMPTY_ATTRIBUTE = "gochan-empty"

_T = TypeVar("_T")
_NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


def _quote(text: str) -> str:
    return "".join(
        c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )


def topic_id(topic: str, prefix: str = "") -> str:
    """The Pub/Sub topic id of a gochan topic (see the module docstring)."""
    return prefix + _quote(topic)


def gochan_topic(pubsub_topic_id: str, prefix: str = "") -> str:
    """The gochan topic of a Pub/Sub topic id: the inverse of :func:`topic_id`."""
    if not pubsub_topic_id.startswith(prefix):
        raise ValueError(f"{pubsub_topic_id!r} does not start with {prefix!r}")
    return unquote(pubsub_topic_id[len(prefix) :], errors="strict")


@dataclass
class _Subscription:
    topic: str
    topic_path: str  # resource name, for request bodies
    topic_url_path: str  # the same, escaped for URLs
    path: str
    task: asyncio.Task[None] | None = None


class PubSubDriver(Lifecycle[None]):
    """Relay Google Cloud Pub/Sub topics.

    Keyword arguments (all optional):

    ``project`` (str)
        The Google Cloud project of the topics and subscriptions. Default ``gochan``.
    ``emulator_host`` (str)
        ``host:port`` of a Pub/Sub emulator (no credentials, plain HTTP).
        ``""`` uses ``PUBSUB_EMULATOR_HOST`` if set, else Google's service.
    ``prefix`` (str)
        Prepended to topic ids and subscription ids; must start with a letter
        and use ``[A-Za-z0-9-_.~+]``. Default ``""``.
    ``create_topics`` (bool)
        Create a missing Pub/Sub topic at subscribe and publish time (needs
        the ``pubsub.topics.create`` permission); when off, a missing topic is
        an error. Default on.
    ``service_file`` (str)
        Path of a service account key; ``""`` uses Application Default
        Credentials. Unused with an emulator.
    ``timeout`` (float, seconds)
        Bound on every call but the long-polling pull. Default 10.
    ``pull_timeout`` (int, seconds)
        How long one pull may wait for messages. Default 30.
    ``reconnect_min``, ``reconnect_max`` (float, seconds)
        Backoff bounds between probes after an error. Default 0.1, 10.
    """

    name: ClassVar[str] = "pubsub"
    broker: ClassVar[str] = "Pub/Sub"

    def __init__(
        self,
        project: str = DEFAULT_PROJECT,
        emulator_host: str = "",
        prefix: str = DEFAULT_PREFIX,
        create_topics: bool = True,
        service_file: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
        pull_timeout: int = DEFAULT_PULL_TIMEOUT_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if not project:
            raise ConfigurationError("pubsub: project is empty")
        if prefix and (not prefix[0].isascii() or not prefix[0].isalpha()):
            raise ConfigurationError(f"pubsub: prefix {prefix!r} must start with a letter")
        if any(c not in _SAFE for c in prefix):
            raise ConfigurationError(f"pubsub: prefix {prefix!r} may only use A-Z a-z 0-9 -_.~+")
        require_positive("pubsub", timeout=timeout, pull_timeout=pull_timeout)
        self.project = project
        self.emulator_host = emulator_host
        self.prefix = prefix
        self.create_topics = bool(create_topics)
        self.service_file = service_file
        self.timeout = float(timeout)
        self.pull_timeout = int(pull_timeout)
        self.process_token = secrets.token_hex(PROCESS_TOKEN_BYTES)

        super().__init__(reconnect_min, reconnect_max)
        self._session: aiohttp.ClientSession | None = None
        self._publisher: PublisherClient | None = None
        self._subscriber: SubscriberClient | None = None
        self._topics: dict[str, _Subscription] = {}
        self._lock = asyncio.Lock()
        self._counter = 0

    def _where(self) -> str:
        return f"Pub/Sub (project {self.project})"

    def topic_id(self, topic: str) -> str:
        """The Pub/Sub topic id for ``topic`` (after :meth:`check_topic`)."""
        return topic_id(topic, self.prefix)

    def topic_path(self, topic: str) -> str:
        """The topic's resource name, as the API's request bodies hold it."""
        return f"projects/{self.project}/topics/{self.topic_id(topic)}"

    def _topic_url_path(self, topic: str) -> str:
        # The client pastes resource names into URLs as they are: a topic id's
        # own "%XX" escapes must be escaped again to survive in the path.
        return f"projects/{self.project}/topics/{quote(self.topic_id(topic), safe='')}"

    def check_topic(self, topic: str) -> None:
        if not topic:
            raise InvalidTopicError(topic, "empty")
        tid = self.topic_id(topic)
        if not (tid[0].isascii() and tid[0].isalpha()):
            raise InvalidTopicError(topic, "Pub/Sub topic ids must start with a letter")
        if not ID_MIN_CHARS <= len(tid) <= ID_MAX_CHARS:
            raise InvalidTopicError(
                topic,
                f"the Pub/Sub topic id {tid!r} is not {ID_MIN_CHARS}..{ID_MAX_CHARS} characters",
            )
        if tid.lower().startswith("goog"):
            raise InvalidTopicError(topic, "Pub/Sub topic ids must not start with 'goog'")

    async def _start(self) -> None:
        api_root = f"http://{self.emulator_host}/v1" if self.emulator_host else None
        service_file = self.service_file or None
        # No connection limit: every held topic keeps a pull waiting.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # gcloud-aio's hints name requests.Session (its sync twin's type) here.
        self._publisher = PublisherClient(
            session=self._session,  # type: ignore[arg-type]
            api_root=api_root,
            service_file=service_file,
        )
        self._subscriber = SubscriberClient(
            session=self._session,  # type: ignore[arg-type]
            api_root=api_root,
            service_file=service_file,
        )

    async def _stop(self) -> None:
        subs = list(self._topics.values())
        self._topics.clear()
        for sub in subs:
            await self._stop_pull(sub)
        if self._session is not None:
            await self._session.close()
        self._session = self._publisher = self._subscriber = None

    async def _open(self) -> None:
        """Every call is a request of its own: only see that the service answers."""
        assert self._publisher is not None
        await self._bounded(self._probe(self._publisher))

    async def _restore(self, conn: None) -> bool:
        for topic, reason in await self._restore_all():
            self._report_failure(topic, reason)
        return True

    async def _discard(self, conn: None) -> None:
        pass

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        self._check_ready()
        async with self._lock:
            if topic in self._topics:
                return
            self._counter += 1
            sub_id = f"{self.prefix}gochan-{self.process_token}-{self._counter}"
            sub = _Subscription(
                topic,
                self.topic_path(topic),
                self._topic_url_path(topic),
                f"projects/{self.project}/subscriptions/{sub_id}",
            )
            try:
                await self._bounded(self._create_subscription(sub))
            except _NETWORK_ERRORS as exc:
                raise BrokerError(f"pubsub: cannot subscribe to {topic!r}: {exc!r}") from exc
            sub.task = asyncio.create_task(self._pull_loop(sub), name=f"gochan-pubsub-{sub_id}")
            self._topics[topic] = sub
        broker_logger.debug("pubsub: subscribed %s to %s", sub.path, sub.topic_path)

    async def unsubscribe(self, topic: str) -> None:
        async with self._lock:
            sub = self._topics.pop(topic, None)
            if sub is None:
                return
            await self._stop_pull(sub)
            await self._delete_subscription(sub)

    async def publish(self, topic: str, data: bytes) -> str:
        self.check_topic(topic)
        self._check_ready()
        assert self._publisher is not None
        message = (
            PubsubMessage(bytes(data)) if data else PubsubMessage(b"", **{EMPTY_ATTRIBUTE: "1"})
        )
        path = self._topic_url_path(topic)
        try:
            try:
                response = await self._bounded(self._publisher.publish(path, [message]))
            except aiohttp.ClientResponseError as exc:
                if exc.status != HTTP_NOT_FOUND or not self.create_topics:
                    raise
                await self._bounded(self._create_topic(path))
                response = await self._bounded(self._publisher.publish(path, [message]))
        except _NETWORK_ERRORS as exc:
            raise BrokerError(f"pubsub: cannot publish to {topic!r}: {exc!r}") from exc
        self._published += 1
        return str(response["messageIds"][0])

    async def _close(self) -> None:
        subs = list(self._topics.values())
        self._topics.clear()
        for sub in subs:
            await self._stop_pull(sub)
        if self._subscriber is not None:
            await asyncio.gather(*(self._delete_subscription(sub) for sub in subs))

    # -- internals -----------------------------------------------------------

    async def _bounded(self, aw: Awaitable[_T]) -> _T:
        return await bounded(aw, self.timeout, "Pub/Sub")

    async def _probe(self, publisher: PublisherClient) -> None:
        await publisher.list_topics(f"projects/{self.project}", {"pageSize": "1"})

    async def _create_topic(self, topic_url_path: str) -> None:
        assert self._publisher is not None
        try:
            await self._publisher.create_topic(topic_url_path)
        except aiohttp.ClientResponseError as exc:
            if exc.status != HTTP_CONFLICT:  # created meanwhile by someone else
                raise

    async def _create_subscription(self, sub: _Subscription) -> None:
        assert self._subscriber is not None
        body = {
            "ackDeadlineSeconds": ACK_DEADLINE_S,
            "messageRetentionDuration": RETENTION,
            "expirationPolicy": {"ttl": EXPIRATION_TTL},
            "labels": {"gochan": "process"},
        }
        try:
            await self._subscriber.create_subscription(sub.path, sub.topic_path, body)
        except aiohttp.ClientResponseError as exc:
            if exc.status != HTTP_NOT_FOUND or not self.create_topics:
                raise
            await self._create_topic(sub.topic_url_path)
            await self._subscriber.create_subscription(sub.path, sub.topic_path, body)

    async def _delete_subscription(self, sub: _Subscription) -> None:
        assert self._subscriber is not None
        try:
            await self._bounded(self._subscriber.delete_subscription(sub.path))
        except aiohttp.ClientResponseError as exc:
            if exc.status != HTTP_NOT_FOUND:
                broker_logger.warning("pubsub: cannot delete %s: %r", sub.path, exc)
        except _NETWORK_ERRORS as exc:
            broker_logger.warning("pubsub: cannot delete %s: %r", sub.path, exc)

    @staticmethod
    async def _stop_pull(sub: _Subscription) -> None:
        await cancel_and_wait(sub.task)
        sub.task = None

    async def _pull_loop(self, sub: _Subscription) -> None:
        assert self._subscriber is not None
        subscriber = self._subscriber
        while True:
            await self._ready_event.wait()
            try:
                messages = await subscriber.pull(sub.path, PULL_BATCH, timeout=self.pull_timeout)
            except asyncio.TimeoutError:
                continue  # nothing to deliver during a whole long poll
            except Exception as exc:  # the supervisor restores the service
                if not isinstance(exc, _NETWORK_ERRORS):
                    broker_logger.exception("pubsub: pull on %s failed unexpectedly", sub.path)
                self._lose(f"pull on {sub.path} failed: {exc!r}")
                await self._ready_event.wait()  # the last _lose may come while restoring
                continue
            if not messages:
                continue
            for message in messages:
                self._deliver(sub.topic, message.data or b"", message.message_id)
            try:
                await self._bounded(subscriber.acknowledge(sub.path, [m.ack_id for m in messages]))
            except _NETWORK_ERRORS as exc:
                # They come back after the ack deadline: duplicates, not losses.
                broker_logger.warning("pubsub: cannot acknowledge on %s: %r", sub.path, exc)

    async def _restore_all(self) -> list[tuple[str, str]]:
        """Recreate the subscriptions the service forgot.

        A subscription the service refuses to recreate is dropped and
        returned with the reason; a network error propagates, and the whole
        restore is tried again.
        """
        assert self._subscriber is not None
        failed: list[tuple[str, str]] = []
        async with self._lock:
            for topic, sub in list(self._topics.items()):
                try:
                    await self._bounded(self._subscriber.get_subscription(sub.path))
                    continue
                except aiohttp.ClientResponseError as exc:
                    if exc.status != HTTP_NOT_FOUND:
                        raise
                try:
                    await self._bounded(self._create_subscription(sub))
                    broker_logger.info("pubsub: recreated %s", sub.path)
                except aiohttp.ClientResponseError as exc:
                    failed.append((topic, f"cannot recreate the Pub/Sub subscription: {exc}"))
                    del self._topics[topic]
                    await self._stop_pull(sub)
        return failed
