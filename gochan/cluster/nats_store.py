"""The cluster store on NATS: records in a JetStream key-value bucket, node
inboxes as core NATS subjects.

The bucket ``<cluster_name>_clients`` keeps one revision per key (history 1,
file storage) and its ``max_age`` is the records' expiry: a record lives that
long after its last write, so a holder rewrites it (``touch``) to keep it.
JetStream before 2.11 has no per-key expiry; the bucket's is fixed when it is
created, so nodes of one cluster must agree on ``client_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.kv import KeyValue

from ..drivers._common import redact_url
from ..drivers._nats_client import CONNECTION_ERRORS
from ..errors import BrokerConnectionError, BrokerError
from ..log import broker_logger
from .store import ALL_NODES, Entry, OnMessage

__all__ = ["NatsStore"]

CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0
RECONNECT_WAIT_S = 0.5
TOUCH_BATCH = 256  # records rewritten at once (each a read and a write)


class NatsStore:
    """A :class:`~gochan.cluster.store.ClusterStore` on one NATS server (or
    cluster of them) with JetStream on."""

    def __init__(self, url: str, cluster_name: str) -> None:
        self._servers = [s.strip() for s in url.split(",") if s.strip()]
        self._url = ",".join(redact_url(s) for s in self._servers)
        self._bucket = f"{cluster_name}_clients"
        self._subject = f"{cluster_name}.cluster"
        self._nc: Client | None = None
        self._kv: KeyValue | None = None

    @property
    def url(self) -> str:
        return self._url

    @property
    def ready(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def connect(self, node_id: str, on_message: OnMessage, record_ttl: float) -> None:
        async def quiet(exc: Exception) -> None:
            broker_logger.warning("cluster store %s: %s", self._url, exc)

        try:
            nc = await nats.connect(
                servers=self._servers,
                connect_timeout=CONNECT_TIMEOUT_S,
                reconnect_time_wait=RECONNECT_WAIT_S,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=quiet,
                name=f"gochan-cluster-{node_id}",
            )
        except Exception as exc:
            raise BrokerConnectionError(f"cluster store {self._url}: {exc}") from exc
        self._nc = nc
        js = nc.jetstream(timeout=REQUEST_TIMEOUT_S)
        config = api.KeyValueConfig(
            bucket=self._bucket, history=1, ttl=record_ttl, storage=api.StorageType.FILE
        )
        try:
            try:
                self._kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:
                # It exists with another configuration (another node's
                # client_ttl): use it as it is.
                self._kv = await js.key_value(self._bucket)
                broker_logger.warning(
                    "cluster store: bucket %s exists with another record expiry; using it",
                    self._bucket,
                )

            def deliver(msg: Msg) -> None:
                on_message(msg.data)

            async def callback(msg: Msg) -> None:
                deliver(msg)

            await nc.subscribe(f"{self._subject}.node.{node_id}", cb=callback)
            await nc.subscribe(f"{self._subject}.all", cb=callback)
            await nc.flush(timeout=int(REQUEST_TIMEOUT_S))
        except Exception as exc:
            await self.close()
            raise BrokerConnectionError(f"cluster store {self._url}: {exc}") from exc

    async def close(self) -> None:
        nc, self._nc, self._kv = self._nc, None, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def _bucket_kv(self) -> KeyValue:
        if self._kv is None:
            raise BrokerConnectionError(f"cluster store {self._url}: not connected")
        return self._kv

    async def _call(self, operation: Any) -> Any:
        try:
            return await operation
        except CONNECTION_ERRORS as exc:
            raise BrokerConnectionError(f"cluster store {self._url}: {exc!r}") from exc
        except nats.errors.Error as exc:
            raise BrokerError(f"cluster store {self._url}: {exc!r}") from exc

    async def get(self, key: str) -> Entry | None:
        kv = self._bucket_kv()
        try:
            entry = await self._call(kv.get(key))
        except BrokerError as exc:
            if isinstance(exc.__cause__, (nats.js.errors.KeyNotFoundError,)):
                return None
            raise
        if entry.value is None:
            return None
        return Entry(entry.value, entry.revision)

    async def create(self, key: str, value: bytes) -> int | None:
        try:
            revision: int = await self._call(self._bucket_kv().create(key, value))
        except BrokerError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyWrongLastSequenceError):
                return None
            raise
        return revision

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        try:
            written: int = await self._call(self._bucket_kv().update(key, value, last=revision))
        except BrokerError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyWrongLastSequenceError):
                return None
            raise
        return written

    async def delete(self, key: str, revision: int) -> bool:
        try:
            await self._call(self._bucket_kv().delete(key, last=revision))
        except BrokerError as exc:
            if isinstance(exc.__cause__, nats.js.errors.KeyWrongLastSequenceError):
                return False
            raise
        return True

    async def touch(self, keys: list[str]) -> None:
        # Rewritten as they are: the bucket's max_age restarts with each
        # write. A record written meanwhile by another node is fresh already.
        async def one(key: str) -> None:
            entry = await self.get(key)
            if entry is not None:
                await self.update(key, entry.value, entry.revision)

        for start in range(0, len(keys), TOUCH_BATCH):
            batch = keys[start : start + TOUCH_BATCH]
            results = await asyncio.gather(*(one(k) for k in batch), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def send(self, node_id: str, payload: bytes) -> None:
        nc = self._nc
        if nc is None:
            raise BrokerConnectionError(f"cluster store {self._url}: not connected")
        where = "all" if node_id == ALL_NODES else f"node.{node_id}"
        await self._call(nc.publish(f"{self._subject}.{where}", payload))
