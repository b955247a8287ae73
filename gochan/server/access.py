"""The access log: one JSON line per request on the ``gochan.access`` logger.

Off by default (``access_log``); when off, a request costs one attribute
check. A line says when (``time``, UTC), who (``peer``), what (``method``,
``path``, ``query``), and how it went (``status``, ``bytes`` written, head
included, and ``duration_s`` from the request read to its answer handed to
the socket). An event stream gets its line when it ends, with the stream's
whole duration and bytes (``"stream": true``).

Never logged: headers (so no ``Authorization``, ``Cookie`` or publish key),
bodies, and the values of the query parameters ``id`` and ``access_token``:
a client id is a bearer credential like a token, so both show as
``[redacted]``; the parameters' names, and the other values (topics,
``last_event_id``), stay.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from urllib.parse import unquote_plus

import orjson

from ..log import access_logger
from .http import Peer, Request

__all__ = ["AccessLog", "redact_query"]

REDACTED = "[redacted]"
SECRET_PARAMETERS = frozenset(("id", "access_token"))
# A logged query is cut to this many characters (a connect may name 1000 topics).
QUERY_CHARS = 2048


def redact_query(query: str) -> str:
    """``query`` with the values of ``id`` and ``access_token`` replaced by
    ``[redacted]``, however their names are escaped (``%69d`` is ``id``)."""
    if not query:
        return ""
    parts = query.split("&")
    for i, part in enumerate(parts):
        name, eq, value = part.partition("=")
        if eq and value:
            plain = unquote_plus(name, errors="replace") if "%" in name or "+" in name else name
            if plain.lower() in SECRET_PARAMETERS:
                parts[i] = name + "=" + REDACTED
    text = "&".join(parts)
    return text if len(text) <= QUERY_CHARS else text[:QUERY_CHARS] + "..."


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AccessLog:
    """Writes the lines. Without handlers of its own, ``gochan.access`` gets
    one that writes the bare JSON to stderr (not through the root logger's
    format), at INFO whatever ``log_level`` says: asking for the access log
    is asking for its lines. An embedder who configured ``gochan.access``
    keeps its own handlers."""

    __slots__ = ("_logger", "_streams")

    def __init__(self, logger: logging.Logger = access_logger) -> None:
        self._logger = logger
        self._streams: dict[object, Request] = {}  # open streams: their request
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)

    def _line(
        self,
        peer: Peer,
        request: Request | None,
        status: int,
        size: int,
        *,
        stream: bool = False,
    ) -> None:
        duration = None
        if request is not None and request.started:
            duration = round(time.monotonic() - request.started, 6)
        line = {
            "time": _now(),
            "peer": peer,
            "method": request.method if request is not None else None,
            "path": request.path if request is not None else None,
            "query": redact_query(request.query_string) if request is not None else "",
            "status": status,
            "bytes": size,
            "duration_s": duration,
            "stream": stream,
        }
        self._logger.info(orjson.dumps(line).decode())

    def response(self, request: Request, status: int, size: int) -> None:
        """A whole answer to ``request``."""
        self._line(request.peer, request, status, size)

    def unparsed(self, peer: Peer, status: int, size: int) -> None:
        """An error answered without a request read whole: a connection
        refused (limits, shutdown), a malformed or timed-out request
        (``method`` and ``path`` are null)."""
        self._line(peer, None, status, size)

    def stream_opened(self, key: object, request: Request) -> None:
        self._streams[key] = request

    def stream_ended(self, key: object, peer: Peer, size: int) -> None:
        request = self._streams.pop(key, None)
        if request is not None:
            self._line(peer, request, 200, size, stream=True)
