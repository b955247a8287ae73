"""The AWS driver: SNS topics fanned out to one SQS queue per process (aiobotocore).

Every gochan process creates its own SQS queue (``<prefix>q-<random>``) at
``connect``. ``subscribe(topic)`` creates (or finds) the SNS topic
``<prefix><topic>`` and subscribes the queue to it; ``unsubscribe`` removes
that subscription. SNS copies every message to every subscribed queue, so
every process holding a topic receives all of its messages (fan-out, never
competing consumers). A long-poll loop receives from the queue, delivers, and
deletes. ``close`` removes the subscriptions and deletes the queue; the SNS
topics stay (other processes and publishers share them).

The subscriptions use SNS's JSON envelope, not raw message delivery: raw
delivery drops the ``TopicArn``, and a queue shared by several topics could
then not tell them apart. The envelope also carries the SNS ``MessageId``,
which is the event id given to the receiver and returned by ``publish``.

Topic mapping: the SNS topic name is ``prefix + topic``, unchanged. gochan
topics with characters other than ``[A-Za-z0-9_-]``, or longer than 256
characters with the prefix, are refused by :meth:`check_topic` (no escaping,
so plain SNS publishers and gochan use the same names).

Bodies: SNS carries text. A body that is UTF-8 text which SQS accepts (no
control characters other than TAB, LF, CR) is published as is, and a plain
SNS publisher's message arrives as its UTF-8 bytes. Any other body (binary,
or empty, which SNS refuses) is published base64-encoded with the message
attribute ``gochan-encoding=base64`` and decoded on receipt, so it arrives
unchanged at gochan processes; plain SQS consumers see the base64 text.

Outages: any receive error (connection lost, queue gone because the endpoint
was reset) makes the driver not :attr:`ready` and restores the queue and every
subscription with jittered exponential backoff, counting one reconnect; a topic whose
subscription cannot be restored is reported with ``on_subscription_failure``.

Production notes: the queue needs a policy letting SNS deliver to it; the
driver sets one that admits the SNS topics ``<prefix>*`` of the same account.
Queues of processes that died without ``close`` stay behind (they are tagged
``gochan=process-queue``): remove them with a periodic job. AWS applies new
subscriptions within moments, not at once, so a message published right after
``subscribe`` returns may, rarely, not be delivered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import orjson
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.config import Config  # type: ignore[import-untyped]
from botocore.exceptions import (  # type: ignore[import-untyped]
    BotoCoreError,
    ClientError,
)

from ..errors import (
    BrokerError,
    ConfigurationError,
    InvalidTopicError,
)
from ..log import broker_logger
from ..waiting import within
from ._common import bounded, require_positive
from ._lifecycle import Lifecycle

__all__ = ["SqsDriver"]

DEFAULT_ENDPOINT_URL = ""  # "" = AWS's own endpoints (or AWS_ENDPOINT_URL)
DEFAULT_REGION = "us-east-1"
DEFAULT_PREFIX = "gochan-"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_WAIT_TIME_S = 20  # SQS long poll, 0..20 s
DEFAULT_RECONNECT_MIN_S = 0.1
DEFAULT_RECONNECT_MAX_S = 10.0
QUEUE_RETENTION_S = 300  # a live relay has no use for older messages
QUEUE_VISIBILITY_TIMEOUT_S = 30
RECEIVE_BATCH = 10  # SQS's maximum per ReceiveMessage
MAX_WAIT_TIME_S = 20

SNS_TOPIC_MAX_CHARS = 256
SQS_QUEUE_MAX_CHARS = 80
QUEUE_TOKEN_BYTES = 8
_NAME_RE = re.compile(r"[A-Za-z0-9_-]*")
# Characters an SQS message body may hold (the XML 1.0 character set).
_SQS_TEXT_RE = re.compile("[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]*")

ENCODING_ATTRIBUTE = "gochan-encoding"
ENCODING_BASE64 = "base64"

_T = TypeVar("_T")


def encode_body(data: bytes) -> tuple[str, dict[str, Any]]:
    """The SNS ``Message`` and ``MessageAttributes`` that carry ``data``."""
    if data:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if _SQS_TEXT_RE.fullmatch(text) is not None:
                return text, {}
    attrs = {ENCODING_ATTRIBUTE: {"DataType": "String", "StringValue": ENCODING_BASE64}}
    # SNS refuses an empty message: an empty body travels as "=" ("" in base64).
    return base64.b64encode(data).decode("ascii") or "=", attrs


def decode_body(message: str, attributes: dict[str, Any]) -> bytes:
    encoding = attributes.get(ENCODING_ATTRIBUTE, {}).get("Value")
    if encoding == ENCODING_BASE64:
        return b"" if message == "=" else base64.b64decode(message)
    return message.encode("utf-8")


class SqsDriver(Lifecycle[None]):
    """Relay SNS topics through a per-process SQS queue.

    Keyword arguments (all optional):

    ``endpoint_url`` (str)
        One endpoint for both SNS and SQS (LocalStack, moto). ``""`` uses
        AWS's regional endpoints (botocore also honours ``AWS_ENDPOINT_URL``).
    ``region`` (str)
        AWS region. Default ``us-east-1``.
    ``prefix`` (str)
        Prepended to gochan topics to form SNS topic names, and to the
        process's queue name (``[A-Za-z0-9_-]``). Default ``gochan-``.
    ``access_key_id``, ``secret_access_key`` (str)
        Explicit credentials; ``""`` uses botocore's usual chain (environment,
        profile, instance role).
    ``timeout`` (float, seconds)
        Bound on every SNS/SQS call but the long poll. Default 10.
    ``wait_time`` (int, seconds, 1..20)
        SQS long-poll duration. Default 20.
    ``reconnect_min``, ``reconnect_max`` (float, seconds)
        Backoff bounds between restore attempts after an error. Default 0.1, 10.
    """

    name: ClassVar[str] = "sqs"
    broker: ClassVar[str] = "SNS/SQS"

    def __init__(
        self,
        endpoint_url: str = DEFAULT_ENDPOINT_URL,
        region: str = DEFAULT_REGION,
        prefix: str = DEFAULT_PREFIX,
        access_key_id: str = "",
        secret_access_key: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
        wait_time: int = DEFAULT_WAIT_TIME_S,
        reconnect_min: float = DEFAULT_RECONNECT_MIN_S,
        reconnect_max: float = DEFAULT_RECONNECT_MAX_S,
    ) -> None:
        if _NAME_RE.fullmatch(prefix) is None:
            raise ConfigurationError(f"sqs: prefix {prefix!r} may only contain A-Z a-z 0-9 _ -")
        if not 1 <= wait_time <= MAX_WAIT_TIME_S:
            raise ConfigurationError(f"sqs: wait_time must be 1..{MAX_WAIT_TIME_S} seconds")
        require_positive("sqs", timeout=timeout)
        if bool(access_key_id) != bool(secret_access_key):
            raise ConfigurationError("sqs: give both access_key_id and secret_access_key, or none")
        self.endpoint_url = endpoint_url
        self.region = region
        self.prefix = prefix
        self.timeout = float(timeout)
        self.wait_time = int(wait_time)
        self._credentials = (access_key_id, secret_access_key)
        self.queue_name = f"{prefix}q-{secrets.token_hex(QUEUE_TOKEN_BYTES)}"
        if len(self.queue_name) > SQS_QUEUE_MAX_CHARS:
            raise ConfigurationError(
                f"sqs: prefix too long for an SQS queue name ({SQS_QUEUE_MAX_CHARS} chars)"
            )

        super().__init__(reconnect_min, reconnect_max)
        self._stack: contextlib.AsyncExitStack | None = None
        self._sqs: Any = None
        self._sns: Any = None
        self.queue_url = ""
        self.queue_arn = ""
        # gochan topic -> (SNS topic ARN, subscription ARN)
        self._topics: dict[str, tuple[str, str]] = {}
        self._by_arn: dict[str, str] = {}  # SNS topic ARN -> gochan topic
        self._lock = asyncio.Lock()

    def sns_topic(self, topic: str) -> str:
        """The SNS topic name for ``topic`` (after :meth:`check_topic`)."""
        return self.prefix + topic

    def check_topic(self, topic: str) -> None:
        if not topic:
            raise InvalidTopicError(topic, "empty")
        if _NAME_RE.fullmatch(topic) is None:
            raise InvalidTopicError(
                topic, "SNS topic names may only contain A-Z, a-z, 0-9, '_' and '-'"
            )
        if len(self.sns_topic(topic)) > SNS_TOPIC_MAX_CHARS:
            raise InvalidTopicError(
                topic, f"SNS topic names are at most {SNS_TOPIC_MAX_CHARS} characters"
            )

    async def _start(self) -> None:
        session = get_session()
        config = Config(
            connect_timeout=self.timeout,
            read_timeout=self.wait_time + self.timeout,
            retries={"mode": "standard", "total_max_attempts": 2},
        )
        options: dict[str, Any] = {"region_name": self.region, "config": config}
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        if self._credentials[0]:
            options["aws_access_key_id"], options["aws_secret_access_key"] = self._credentials
        self._stack = stack = contextlib.AsyncExitStack()
        self._sqs = await stack.enter_async_context(session.create_client("sqs", **options))
        self._sns = await stack.enter_async_context(session.create_client("sns", **options))

    async def _stop(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        self._sqs = self._sns = None
        self._topics.clear()
        self._by_arn.clear()

    async def _open(self) -> None:
        """Create the process queue (idempotent: also restores a lost one)."""
        await self._bounded(self._create_queue())

    async def _restore(self, conn: None) -> bool:
        """Subscribe the queue to every topic again (idempotent on SNS)."""
        for topic, reason in await self._resubscribe_all():
            self._report_failure(topic, reason)
        return True

    async def _discard(self, conn: None) -> None:
        pass  # nothing to close: every call is a request of its own

    async def subscribe(self, topic: str) -> None:
        self.check_topic(topic)
        self._check_ready()
        async with self._lock:
            if topic in self._topics:
                return
            try:
                topic_arn, sub_arn = await self._bounded(self._subscribe(topic))
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                raise BrokerError(f"sqs: cannot subscribe to {topic!r}: {exc!r}") from exc
            self._topics[topic] = (topic_arn, sub_arn)
            self._by_arn[topic_arn] = topic
        broker_logger.debug("sqs: subscribed %s", sub_arn)

    async def unsubscribe(self, topic: str) -> None:
        async with self._lock:
            arns = self._topics.pop(topic, None)
            if arns is None:
                return
            topic_arn, sub_arn = arns
            del self._by_arn[topic_arn]  # nothing more is delivered from here on
            try:
                await self._bounded(self._sns.unsubscribe(SubscriptionArn=sub_arn))
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                # The messages that still come are dropped (unknown TopicArn).
                broker_logger.warning("sqs: cannot remove subscription %s: %r", sub_arn, exc)

    async def publish(self, topic: str, data: bytes) -> str:
        self.check_topic(topic)
        self._check_ready()
        message, attributes = encode_body(bytes(data))
        topic_arn = self._topic_arn(topic)
        try:
            try:
                response = await self._bounded(
                    self._sns.publish(
                        TopicArn=topic_arn, Message=message, MessageAttributes=attributes
                    )
                )
            except ClientError as exc:
                if _error_code(exc) != "NotFound":
                    raise
                # Nobody created the topic yet: create it (idempotent), retry.
                created = await self._bounded(self._sns.create_topic(Name=self.sns_topic(topic)))
                response = await self._bounded(
                    self._sns.publish(
                        TopicArn=created["TopicArn"], Message=message, MessageAttributes=attributes
                    )
                )
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            raise BrokerError(f"sqs: cannot publish to {topic!r}: {exc!r}") from exc
        self._published += 1
        return str(response["MessageId"])

    async def _close(self) -> None:
        if self._sns is None:
            return
        subs = [sub_arn for _, sub_arn in self._topics.values()]
        results = await asyncio.gather(
            *(self._bounded(self._sns.unsubscribe(SubscriptionArn=arn)) for arn in subs),
            return_exceptions=True,
        )
        for arn, result in zip(subs, results, strict=True):
            if isinstance(result, BaseException):
                broker_logger.warning("sqs: cannot remove subscription %s: %r", arn, result)
        try:
            await self._bounded(self._sqs.delete_queue(QueueUrl=self.queue_url))
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            broker_logger.warning("sqs: cannot delete queue %s: %r", self.queue_url, exc)

    # -- internals -----------------------------------------------------------

    async def _bounded(self, aw: Awaitable[_T]) -> _T:
        return await bounded(aw, self.timeout, "SNS/SQS")

    def _topic_arn(self, topic: str) -> str:
        # arn:<partition>:sqs:<region>:<account>:<queue> -> the SNS topic's ARN
        partition, _, region, account = self.queue_arn.split(":")[1:5]
        return f"arn:{partition}:sns:{region}:{account}:{self.sns_topic(topic)}"

    async def _create_queue(self) -> None:
        """Create the process queue (idempotent: also restores a lost one)."""
        response = await self._sqs.create_queue(
            QueueName=self.queue_name,
            Attributes={
                "MessageRetentionPeriod": str(QUEUE_RETENTION_S),
                "VisibilityTimeout": str(QUEUE_VISIBILITY_TIMEOUT_S),
            },
            tags={"gochan": "process-queue"},
        )
        self.queue_url = response["QueueUrl"]
        attrs = await self._sqs.get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["QueueArn"]
        )
        self.queue_arn = attrs["Attributes"]["QueueArn"]
        topics_arn = self._topic_arn("*")
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "gochan-sns",
                    "Effect": "Allow",
                    "Principal": {"Service": "sns.amazonaws.com"},
                    "Action": "sqs:SendMessage",
                    "Resource": self.queue_arn,
                    "Condition": {"ArnLike": {"aws:SourceArn": topics_arn}},
                }
            ],
        }
        await self._sqs.set_queue_attributes(
            QueueUrl=self.queue_url, Attributes={"Policy": orjson.dumps(policy).decode()}
        )

    async def _subscribe(self, topic: str) -> tuple[str, str]:
        created = await self._sns.create_topic(Name=self.sns_topic(topic))
        topic_arn = str(created["TopicArn"])
        response = await self._sns.subscribe(
            TopicArn=topic_arn,
            Protocol="sqs",
            Endpoint=self.queue_arn,
            ReturnSubscriptionArn=True,
        )
        return topic_arn, str(response["SubscriptionArn"])

    async def _serve(self, conn: None) -> str:
        """Receive, deliver and delete, until a receive fails."""
        while True:
            try:
                response = await within(
                    self._sqs.receive_message(
                        QueueUrl=self.queue_url,
                        MaxNumberOfMessages=RECEIVE_BATCH,
                        WaitTimeSeconds=self.wait_time,
                    ),
                    self.wait_time + self.timeout,
                )
            except (BotoCoreError, ClientError, OSError, asyncio.TimeoutError) as exc:
                return f"receive failed: {exc!r}"
            messages = response.get("Messages", [])
            if not messages:
                continue
            for message in messages:
                self._unwrap(message)
            try:
                await self._bounded(
                    self._sqs.delete_message_batch(
                        QueueUrl=self.queue_url,
                        Entries=[
                            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                            for i, m in enumerate(messages)
                        ],
                    )
                )
            except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
                # They come back after the visibility timeout: duplicates.
                broker_logger.warning("sqs: cannot delete received messages: %r", exc)

    def _unwrap(self, message: dict[str, Any]) -> None:
        try:
            envelope = orjson.loads(message["Body"])
            topic_arn = envelope["TopicArn"]
            body = decode_body(envelope["Message"], envelope.get("MessageAttributes") or {})
            event_id = str(envelope["MessageId"])
        except (KeyError, TypeError, ValueError) as exc:
            broker_logger.warning("sqs: dropping a message that is no SNS notification: %r", exc)
            return
        # None for a topic unsubscribed a moment ago
        self._deliver(self._by_arn.get(topic_arn), body, event_id)

    async def _resubscribe_all(self) -> list[tuple[str, str]]:
        """Subscribe the queue to every topic again (idempotent on SNS).

        A topic that SNS refuses is dropped and returned with the reason;
        a connection error propagates, and the whole restore is retried.
        """
        failed: list[tuple[str, str]] = []
        async with self._lock:
            for topic in list(self._topics):
                try:
                    topic_arn, sub_arn = await self._bounded(self._subscribe(topic))
                except ClientError as exc:
                    failed.append((topic, f"cannot restore the SNS subscription: {exc}"))
                    old_arn, _ = self._topics.pop(topic)
                    self._by_arn.pop(old_arn, None)
                    continue
                self._topics[topic] = (topic_arn, sub_arn)
                self._by_arn[topic_arn] = topic
        return failed


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
