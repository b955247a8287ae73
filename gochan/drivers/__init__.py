"""Drivers: one module per broker, all behind the :class:`Driver` protocol."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigurationError, MissingExtraError
from .base import BatchDriver, Driver, DurableDriver, Receiver, publish_each
from .mem import MemDriver

__all__ = [
    "DRIVERS",
    "BatchDriver",
    "Driver",
    "DurableDriver",
    "MemDriver",
    "Receiver",
    "create_driver",
    "driver_class",
    "publish_each",
]

# name -> (module, class, pip extra that brings its client library)
DRIVERS: dict[str, tuple[str, str, str | None]] = {
    "mem": ("gochan.drivers.mem", "MemDriver", None),
    "nats": ("gochan.drivers.nats", "NatsDriver", "nats"),
    # RedisDriver builds the pub/sub driver, or with streams=True the Streams one.
    "redis": ("gochan.drivers.redis", "RedisDriver", "redis"),
    "kafka": ("gochan.drivers.kafka", "KafkaDriver", "kafka"),
    "sqs": ("gochan.drivers.sqs", "SqsDriver", "sqs"),
    "pubsub": ("gochan.drivers.pubsub", "PubSubDriver", "pubsub"),
    "rabbitmq": ("gochan.drivers.rabbitmq", "RabbitMQDriver", "rabbitmq"),
    "mqtt": ("gochan.drivers.mqtt", "MqttDriver", "mqtt"),
    "postgres": ("gochan.drivers.postgres", "PostgresDriver", "postgres"),
}


def driver_class(name: str) -> type[Any]:
    """The class of the driver called ``name``; :class:`MissingExtraError`
    (one line naming the pip extra) when its client library is missing."""
    try:
        module_name, class_name, extra = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ConfigurationError(f"driver: expected one of {known}, got {name!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing third-party library is a missing extra; a module of
        # gochan's own that fails to import is a bug, and keeps its traceback.
        if extra is None or (exc.name or "gochan").partition(".")[0] == "gochan":
            raise
        raise MissingExtraError(
            f"driver {name!r} needs its extra: pip install 'gochan[{extra}]'"
        ) from exc
    cls: type[Any] = getattr(module, class_name)
    return cls


def create_driver(name: str, options: dict[str, Any] | None = None) -> Driver:
    """Build the driver called ``name`` with its options (from the config)."""
    driver: Driver = driver_class(name)(**(options or {}))
    return driver
