"""HTTP/1.1 pieces the protocol needs: the request record and response bytes."""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from ..auth import Grant

__all__ = [
    "NO_PEER",
    "Peer",
    "Request",
    "is_loopback_host",
    "json_ok",
    "parse_query",
    "refresh_date",
    "response_head",
    "simple_response",
    "stream_head",
]

MAX_QUERY_FIELDS = 1100  # a browser may name ~1000 topics at connect

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}

_date = b""
_json_ok = b""  # the head of a 200 JSON answer up to its Content-Length value


def refresh_date() -> None:
    """Recompute the cached Date header (called by the server tick)."""
    global _date, _json_ok
    _date = b"Date: " + formatdate(usegmt=True).encode("ascii") + b"\r\n"
    _json_ok = (
        b"HTTP/1.1 200 OK\r\nServer: gochan\r\n" + _date + b"Content-Type: application/json\r\n"
        b"Content-Length: "
    )


refresh_date()


# The peer's IP address as text, one shared instance per address (see
# Server.admit); NO_PEER where it is not known (an adapter, a test double).
Peer = str
NO_PEER: Peer = ""


def is_loopback_host(address: str) -> bool:
    """True for a loopback IP address (127.0.0.0/8, ::1, IPv4-mapped 127.x)."""
    return address.startswith("127.") or address == "::1" or address.startswith("::ffff:127.")


class Request:
    """One parsed request. Header names are lower-case; repeated ones joined."""

    __slots__ = (
        "body",
        "grant",
        "headers",
        "keep_alive",
        "method",
        "path",
        "peer",
        "query_string",
        "started",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        peer: Peer = NO_PEER,
        started: float = 0.0,
    ) -> None:
        self.method = method
        # time.monotonic() once it was read whole; 0.0 unless the access log is on.
        self.started = started
        self.peer = peer
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        # What authorization granted (set by the router when it is on).
        self.grant: Grant | None = None

    def query(self) -> dict[str, list[str]]:
        """The query string's fields (``+`` and ``%XX`` decoded, UTF-8).
        Raises ValueError past MAX_QUERY_FIELDS fields or for escapes that
        are not UTF-8 (they are refused, never replaced)."""
        return parse_query(self.query_string)


def parse_query(qs: str) -> dict[str, list[str]]:
    # parse_qs, minus its generality: most fields need no unquoting at all.
    fields: dict[str, list[str]] = {}
    if not qs:
        return fields
    parts = qs.split("&")
    if len(parts) > MAX_QUERY_FIELDS:
        raise ValueError(f"more than {MAX_QUERY_FIELDS} query parameters")
    if "%" not in qs and "+" not in qs:  # the usual case: nothing to unquote
        for part in parts:
            if part:
                name, _, value = part.partition("=")
                values = fields.get(name)
                if values is None:
                    fields[name] = [value]
                else:
                    values.append(value)
        return fields
    for part in parts:
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in part or "+" in part:
            name, value = unquote_strict(name), unquote_strict(value)
        fields.setdefault(name, []).append(value)
    return fields


def unquote_strict(text: str) -> str:
    """``unquote_plus`` that raises ValueError for escapes that are not UTF-8:
    ``%FF`` and ``%FE`` must not both become U+FFFD and name one topic."""
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("a query parameter is not valid UTF-8 once unescaped") from None


def response_head(
    status: int,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    content_length: int | None = None,
    keep_alive: bool = True,
) -> bytes:
    parts = [
        b"HTTP/1.1 %d %s\r\nServer: gochan\r\n" % (status, _REASONS.get(status, b"Unknown")),
        _date,
    ]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    if content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % content_length)
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# 200 heads of event streams, by their headers: rebuilt once a second (the
# Date), not once a connect. Few kinds exist (the node's, a worker's).
_stream_heads: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, bytes]] = {}
STREAM_HEAD_KINDS = 16


def stream_head(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``response_head(200, headers)``, kept while the Date is the same."""
    key = tuple(headers)
    cached = _stream_heads.get(key)
    if cached is not None and cached[0] is _date:
        return cached[1]
    head = response_head(200, key)
    if cached is not None or len(_stream_heads) < STREAM_HEAD_KINDS:
        _stream_heads[key] = (_date, head)
    return head


TEXT = b"text/plain; charset=utf-8"
JSON = b"application/json"


def json_ok(body: bytes) -> bytes:
    """``simple_response(200, body, content_type=JSON)`` on a keep-alive
    connection with no other header, from a head built once per Date: the
    answer of every publish (building it header by header was a tenth of a
    published message's cost, bench/profiles/notifications.md)."""
    return b"%b%d\r\n\r\n%b" % (_json_ok, len(body), body)


def simple_response(
    status: int,
    body: bytes = b"",
    *,
    content_type: bytes = TEXT,
    headers: Iterable[tuple[bytes, bytes]] = (),
    keep_alive: bool = True,
    head: bool = False,
) -> bytes:
    """A complete response with a Content-Length (no body for HEAD, 204, 304)."""
    all_headers = list(headers)
    if body or status not in (204, 304):
        all_headers.insert(0, (b"Content-Type", content_type))
    length = None if status in (204, 304) else len(body)
    head_bytes = response_head(status, all_headers, content_length=length, keep_alive=keep_alive)
    if head or status in (204, 304):
        return head_bytes
    return head_bytes + body
