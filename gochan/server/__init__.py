"""gochan's HTTP side: a raw asyncio Protocol parsing HTTP/1.1 with httptools."""

from ..streamer import Streamer
from .app import Server
from .protocol import HttpProtocol

# Streamer.serve() and protocol_factory() build this front end.
Streamer.server_class = Server

__all__ = ["HttpProtocol", "Server"]
