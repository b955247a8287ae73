"""The MQTT driver (MQTT 3.1.1, through aiomqtt).

MQTT is a pub/sub broker: every subscriber of a topic gets every message, so
fan-out between gochan processes is the broker's normal behaviour. Each process
holds one connection (clean session) and, per gochan topic it holds, one
subscription to the MQTT topic ``prefix + topic``.

``publish(topic, data)`` publishes ``data`` on ``prefix + topic`` (never
retained). Messages from any MQTT client (``mosquitto_pub -t TOPIC -m BODY``)
reach browsers with the payload byte for byte.

Quality of service: ``qos`` (default 1, at least once) is used for the
subscriptions and for publishing. With QoS 1, ``publish`` returns once the
broker has acknowledged the message (PUBACK); a message reaches a subscriber
with the lower of its publisher's and the subscription's QoS. QoS 0 trades the
acknowledgement for fewer round trips. Delivery to browsers is best effort in
any case: the session is clean, so what is published while this process is
disconnected is not kept for it.

Retained messages are ignored: the broker replays them on every (re)subscribe,
which would show an old message to some clients and not others. A live
publish carrying the retain flag is still delivered (the broker forwards it to
existing subscribers without the flag).

Topic mapping: the MQTT topic is ``prefix + topic``, unchanged otherwise
(``/`` separates MQTT levels; empty levels are fine). A topic is refused
(:class:`~gochan.errors.InvalidTopicError`) when it contains the wildcards
``+`` or ``#``, when the MQTT topic would start with ``$`` (reserved for the
broker, such as ``$SYS``), or when it holds a Unicode non-character
(U+FDD0..U+FDEF, U+xFFFE, U+xFFFF): brokers such as Mosquitto drop the
connection of a client that uses one. NUL and other control characters are
already refused by gochan itself.

Connection loss: ``ready`` turns False, the driver reconnects with exponential
backoff and jitter, subscribes again to every topic it held (in batches) and
counts one reconnect. A topic the broker refuses on the new connection (SUBACK
failure code, for example an ACL) is dropped and reported through
``Receiver.on_subscription_failure``.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from typing import ClassVar

import aiomqtt

from ..errors import (
    BrokerConnectionError,
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)
from ..log import broker_logger
from ..topicset import TopicSet
from ..waiting import within
from ._common import check_topic_bytes, require_positive
from ._lifecycle import Lifecycle

__all__ = ["MqttDriver"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
DEFAULT_QOS = 1
DEFAULT_KEEPALIVE_S = 30
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 10.0

MAX_MQTT_TOPIC_BYTES = 65535  # MQTT UTF-8 string
RESTORE_BATCH = 100  # topic filters per SUBSCRIBE packet when restoring
_WILDCARDS = frozenset("+#")

_mqtt_logger = logging.getLogger("gochan.broker.mqtt")


def _is_noncharacter(ch: str) -> bool:
    code = ord(ch)
    return 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE


def _refused(codes: object) -> bool:
    """Whether a SUBACK result refuses the subscription (code 0x80 or more)."""
    if isinstance(codes, (list, tuple)) and codes:
        code = codes[0]
        return bool(getattr(code, "is_failure", isinstance(code, int) and code >= 0x80))
    return True


class MqttDriver(Lifecycle[aiomqtt.Client]):
    """Fan-out over an MQTT broker (see the module docstring).

    Keyword arguments (all optional; the config layer maps ``host`` to
    ``--mqtt-host`` and ``GOCHAN_MQTT_HOST``, and so on):

    ``host``, ``port``
        The broker. Defaults ``127.0.0.1`` and 1883.
    ``qos``
        QoS (0, 1 or 2) for subscriptions and publishing. Default 1.
    ``prefix``
        Prepended to every gochan topic to form the MQTT topic, for example
        ``"gochan/"`` to keep gochan's topics in their own subtree. Default
        ``""`` (topics map one to one). Must not contain ``+``, ``#`` or NUL,
        nor start with ``$``.
    ``username``, ``password``
        Credentials; an empty ``username`` connects anonymously.
    ``client_id``
        MQTT client identifier; default ``""`` makes a random
        ``gochan-<hex>`` one per process. Two connections with the same id
        take the broker session from each other: never share one.
    ``tls``
        Connect over TLS with the system's trusted certificates. Default False.
    ``keepalive``
        Seconds between keep-alive pings; a dead connection is noticed within
        about 1.5 times this. Default 30.
    ``timeout``
        Seconds to wait for any broker operation (connecting, subscribing,
        publishing) before failing with :class:`~gochan.errors.BrokerError`.
        Default 5.
    ``reconnect_min``, ``reconnect_max``
        Bounds, in seconds, of the exponential backoff between reconnection
        attempts. Defaults 0.1 and 10.
    """

    name: ClassVar[str] = "mqtt"
    broker: ClassVar[str] = "MQTT"

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        qos: int = DEFAULT_QOS,
        prefix: str = "",
        username: str = "",
        password: str = "",
        client_id: str = "",
        tls: bool = False,
        keepalive: int = DEFAULT_KEEPALIVE_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if qos not in (0, 1, 2):
            raise ConfigurationError(f"MQTT qos must be 0, 1 or 2, not {qos!r}")
        if prefix.startswith("$") or _WILDCARDS.intersection(prefix) or "\0" in prefix:
            raise ConfigurationError(
                f"invalid MQTT topic prefix {prefix!r}: it must not start with '$' "
                "nor contain '+', '#' or NUL"
            )
        if not 0 < port < 65536:
            raise ConfigurationError(f"invalid MQTT port {port!r}")
        require_positive("mqtt", keepalive=keepalive, timeout=timeout)
        self._host = host
        self._port = int(port)
        self._qos = int(qos)
        self._prefix = prefix
        self._username = username
        self._password = password
        self._client_id = client_id or f"gochan-{secrets.token_hex(8)}"
        self._tls = tls
        self._keepalive = int(keepalive)
        self._timeout = float(timeout)
        super().__init__(reconnect_min, reconnect_max)
        self._topics: TopicSet = TopicSet()
        self._client: aiomqtt.Client | None = None

    # -- Driver protocol -------------------------------------------------

    @property
    def client_id(self) -> str:
        """The MQTT client identifier of this process."""
        return self._client_id

    def _where(self) -> str:
        return f"the MQTT broker {self._host}:{self._port}"

    def check_topic(self, topic: str) -> None:
        raw = check_topic_bytes(topic)
        if _WILDCARDS.intersection(topic):
            raise InvalidTopicError(topic, "contains '+' or '#' (MQTT wildcards)")
        if not self._prefix and topic.startswith("$"):
            raise InvalidTopicError(topic, "starts with '$' (MQTT topics reserved for the broker)")
        if any(_is_noncharacter(ch) for ch in topic):
            raise InvalidTopicError(topic, "contains a Unicode non-character (refused by MQTT)")
        if len(raw) + len(self._prefix.encode("utf-8")) > MAX_MQTT_TOPIC_BYTES:
            raise InvalidTopicError(topic, "too long for MQTT with the configured prefix")

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        client = self._usable_client()
        if topic in self._topics:
            return
        self._topics.add(topic)  # first: a message arriving before the SUBACK is kept
        try:
            codes = await client.subscribe(
                self._prefix + topic, qos=self._qos, timeout=self._timeout
            )
        except BaseException as exc:
            self._topics.discard(topic)
            if isinstance(exc, Exception):
                raise BrokerError(f"cannot subscribe to {topic!r} on MQTT: {exc}") from exc
            raise
        if _refused(codes):
            self._topics.discard(topic)
            raise BrokerError(f"the MQTT broker refused the subscription to {topic!r}: {codes}")

    async def unsubscribe(self, topic: str) -> None:
        if topic not in self._topics:
            return
        self._topics.discard(topic)  # nothing more is delivered for it from now on
        client = self._client
        if client is None or not self.ready:
            return  # clean session: the subscription died with the connection
        try:
            await client.unsubscribe(self._prefix + topic, timeout=self._timeout)
        except Exception as exc:
            raise BrokerError(f"cannot unsubscribe from {topic!r} on MQTT: {exc}") from exc

    async def publish(self, topic: str, data: bytes) -> str | None:
        self.check_topic(topic)
        client = self._usable_client()
        try:
            await client.publish(
                self._prefix + topic,
                payload=bytes(data),
                qos=self._qos,
                retain=False,
                timeout=self._timeout,
            )
        except Exception as exc:
            if not self.ready:
                raise BrokerConnectionError(
                    f"MQTT connection lost while publishing on {topic!r}: {exc}"
                ) from exc
            raise BrokerError(f"cannot publish on {topic!r} to MQTT: {exc}") from exc
        self._published += 1
        return None

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._discard(client)
        self._topics.clear()

    # -- internals ---------------------------------------------------------

    def _usable_client(self) -> aiomqtt.Client:
        self._check_ready()
        client = self._client
        if client is None:
            raise BrokerConnectionError("not connected to the MQTT broker (reconnecting)")
        return client

    async def _open(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host,
            self._port,
            username=self._username or None,
            password=self._password or None,
            identifier=self._client_id,
            clean_session=True,
            keepalive=self._keepalive,
            timeout=self._timeout,
            logger=_mqtt_logger,
            tls_context=ssl.create_default_context() if self._tls else None,
        )
        await client.__aenter__()
        broker_logger.debug("mqtt: connected to %s:%d", self._host, self._port)
        return client

    async def _discard(self, client: aiomqtt.Client) -> None:
        try:
            await within(client.__aexit__(None, None, None), self._timeout)
        except Exception as exc:
            broker_logger.debug("mqtt: error closing the connection: %r", exc)

    def _dispatch(self, message: aiomqtt.Message) -> None:
        if message.retain:
            return  # a stored message replayed by the broker, not a live one
        name = message.topic.value
        if not name.startswith(self._prefix):
            self._stray += 1
            return
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload).encode("utf-8")
        self._deliver(name[len(self._prefix) :], data)

    async def _serve(self, client: aiomqtt.Client) -> str:
        try:
            async for message in client.messages:
                self._dispatch(message)
        except aiomqtt.MqttError as exc:
            return f"connection lost ({exc})"
        return "connection lost"

    async def _restore(self, client: aiomqtt.Client) -> bool:
        """Make ``client`` the connection and subscribe again to every held
        topic; raises if the connection fails."""
        self._client = client
        topics = list(self._topics)
        for start in range(0, len(topics), RESTORE_BATCH):
            batch = [t for t in topics[start : start + RESTORE_BATCH] if t in self._topics]
            if not batch:
                continue
            codes = await client.subscribe(
                [(self._prefix + t, self._qos) for t in batch], timeout=self._timeout
            )
            for topic, code in zip(batch, codes, strict=False):
                if _refused([code]):
                    if topic in self._topics:
                        self._topics.discard(topic)
                        self._report_failure(topic, f"the MQTT broker refused it again: {code}")
                elif topic not in self._topics:  # unsubscribed while we restored it
                    await client.unsubscribe(self._prefix + topic, timeout=self._timeout)
        return True
