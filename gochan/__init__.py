"""gochan: relay pub/sub messages to web browsers over Server-Sent Events."""

from . import server as _server  # noqa: F401  (registers the HTTP front end)
from .auth import AuthRequest, Grant, JWTAuthorizer, TopicPatterns
from .client import Client, TopicError
from .config import Config
from .drivers import Driver, MemDriver
from .errors import (
    AuthError,
    BatchPublishError,
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
    "AuthError",
    "AuthRequest",
    "BatchPublishError",
    "BrokerConnectionError",
    "BrokerError",
    "Client",
    "ClientExistsError",
    "ClosedError",
    "Config",
    "ConfigurationError",
    "Driver",
    "GochanError",
    "Grant",
    "InterfaceError",
    "InvalidClientIdError",
    "InvalidTopicError",
    "JWTAuthorizer",
    "LimitExceededError",
    "MemDriver",
    "PeerLimitError",
    "Streamer",
    "TopicError",
    "TopicPatterns",
    "UnknownClientError",
    "__version__",
]
