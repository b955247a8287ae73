"""gochan's HTTP side: a raw asyncio Protocol parsing HTTP/1.1 with httptools."""

from .app import Server
from .protocol import HttpProtocol

__all__ = ["HttpProtocol", "Server"]
