"""Drivers: one module per broker, all behind the :class:`Driver` protocol."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigurationError, MissingExtraError
from .base import Driver, DurableDriver, Receiver
from .mem import MemDriver

__all__ = ["DRIVERS", "Driver", "DurableDriver", "MemDriver", "Receiver", "create_driver"]

# name -> (module, class, pip extra that brings its client library)
DRIVERS: dict[str, tuple[str, str, str | None]] = {
    "mem": ("gochan.drivers.mem", "MemDriver", None),
    "nats": ("gochan.drivers.nats", "NatsDriver", "nats"),
    "redis": ("gochan.drivers.redis", "RedisDriver", "redis"),
    "kafka": ("gochan.drivers.kafka", "KafkaDriver", "kafka"),
    "sqs": ("gochan.drivers.sqs", "SqsDriver", "sqs"),
    "pubsub": ("gochan.drivers.pubsub", "PubSubDriver", "pubsub"),
    "rabbitmq": ("gochan.drivers.rabbitmq", "RabbitMQDriver", "rabbitmq"),
    "mqtt": ("gochan.drivers.mqtt", "MqttDriver", "mqtt"),
    "postgres": ("gochan.drivers.postgres", "PostgresDriver", "postgres"),
}


def create_driver(name: str, options: dict[str, Any] | None = None) -> Driver:
    """Build the driver called ``name`` with its options (from the config)."""
    try:
        module_name, class_name, extra = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ConfigurationError(f"unknown driver {name!r} (known: {known})") from None
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise MissingExtraError(
            f"driver {name!r} needs its client library: pip install 'gochan[{extra}]' ({exc})"
        ) from exc
    cls = getattr(module, class_name)
    driver: Driver = cls(**(options or {}))
    return driver
