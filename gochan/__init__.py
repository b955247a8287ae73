"""gochan: relay pub/sub messages to web browsers over Server-Sent Events."""

from . import server as _server  # noqa: F401  (registers the HTTP front end)
from .client import Client, TopicError
from .config import Config
from .drivers import Driver, MemDriver
from .errors import (
    BrokerConnectionError,
    BrokerError,
    ClientExistsError,
    ClosedError,
    ConfigurationError,
    GochanError,
    InterfaceError,
    InvalidClientIdError,
    InvalidTopicError,
    LimitExceededError,
    PeerLimitError,
    UnknownClientError,
)
from .streamer import Streamer

__version__ = "0.1.0"

__all__ = [
    "BrokerConnectionError",
    "BrokerError",
    "Client",
    "ClientExistsError",
    "ClosedError",
    "Config",
    "ConfigurationError",
    "Driver",
    "GochanError",
    "InterfaceError",
    "InvalidClientIdError",
    "InvalidTopicError",
    "LimitExceededError",
    "MemDriver",
    "PeerLimitError",
    "Streamer",
    "TopicError",
    "UnknownClientError",
    "__version__",
]
