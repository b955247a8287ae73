"""The endpoints: what each path answers.

Handlers know nothing of sockets: they take a :class:`Request` and return a
:class:`Response` or an :class:`OpenStream`, or an awaitable of one when they
must wait on the broker. The raw protocol and the ASGI adapter render them.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from mimetypes import guess_type
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from ..client import Client, validate_client_id
from ..config import Config
from ..errors import (
    BrokerError,
    ClosedError,
    InterfaceError,
    InvalidClientIdError,
    InvalidTopicError,
    LimitExceededError,
    PeerLimitError,
    UnknownClientError,
)
from ..frames import first_frame, subscription_failure_frame
from ..log import server_logger
from .http import JSON, TEXT, Peer, Request, is_loopback_host

if TYPE_CHECKING:
    from ..streamer import Streamer

__all__ = ["OpenStream", "Reply", "Response", "Router"]

Headers = list[tuple[bytes, bytes]]


class Response(NamedTuple):
    status: int
    body: bytes = b""
    headers: Headers = []
    content_type: bytes | None = TEXT  # None: the headers say it, no Content-Length


class OpenStream(NamedTuple):
    """Start the event stream of ``client``: the 200 head with ``headers``,
    then ``preamble`` (retry, first frame, failures), then replay and live."""

    client: Client
    headers: Headers
    preamble: bytes
    last_event_id: str


Reply = Response | OpenStream
Handler = Callable[[Request], Reply | Awaitable[Reply]]

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache, no-store, must-revalidate, pre-check=0, post-check=0"),
    (b"Connection", b"keep-alive"),
    (b"X-Accel-Buffering", b"no"),
)
PREFLIGHT_MAX_AGE_S = 600
# Methods that change state: a cross-site page must not be able to send them
# (a form or text/plain fetch needs no preflight).
STATE_CHANGING = frozenset(("POST", "PUT", "PATCH", "DELETE"))
LOOPBACK_NAMES = frozenset(("localhost", "localhost.", "ip6-localhost"))


def _text(status: int, message: object, headers: Headers | None = None) -> Response:
    return Response(status, f"{message}\n".encode(), headers or [])


def _json(status: int, data: Any) -> Response:
    return Response(status, orjson.dumps(data), [], JSON)


@cache
def _client_js() -> bytes:
    return resources.files("gochan").joinpath("static/gochan.js").read_bytes()


class Router:
    def __init__(
        self,
        streamer: Streamer,
        config: Config,
        metrics: Callable[[str], tuple[bytes, str]],
        *,
        trust_loopback: bool = False,
        check_publishers: bool = True,
        no_key_hint: str = "",
    ) -> None:
        """``trust_loopback``: the server listens on loopback addresses only
        (the Server sets it from the addresses it bound; behind ASGI it
        cannot be known). Then, without a publish_key, loopback peers may
        publish, if their request names a loopback Host (DNS rebinding) and
        comes from no foreign Origin. ``check_publishers=False``: the host
        application authorizes publishers. ``metrics``: the scraper's Accept
        header in, the /metrics page and its Content-Type out."""
        self.streamer = streamer
        self.config = config
        self.exposition = metrics
        self.trust_loopback = trust_loopback
        self.check_publishers = check_publishers
        self.no_key_hint = no_key_hint
        # path -> {method: handler}
        self.routes: dict[str, dict[str, Handler]] = {
            config.events_path: {"GET": self.events, "HEAD": self.events},
            config.update_path: {"POST": self.update_subscriptions},
            config.publish_path: {"POST": self.publish},
            config.healthz_path: {"GET": self.healthz, "HEAD": self.healthz},
            config.readyz_path: {"GET": self.readyz, "HEAD": self.readyz},
            config.metrics_path: {"GET": self.metrics, "HEAD": self.metrics},
            config.client_js_path: {"GET": self.client_js, "HEAD": self.client_js},
        }
        self._origins = set(config.cors_origins)
        self._hosts = {h.lower() for h in config.allowed_hosts}
        self._static = Path(config.static_dir).resolve() if config.static_dir else None

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, request: Request) -> Reply | Awaitable[Reply]:
        methods = self.routes.get(request.path)
        if methods is None:
            if self._static is not None and request.method in ("GET", "HEAD"):
                return self.static(request)
            return _text(404, "not found")
        handler = methods.get(request.method)
        if handler is not None:
            if request.method in STATE_CHANGING:
                refused = self.cross_site(request.headers)
                if refused is not None:
                    return _text(403, refused)
            return handler(request)
        allow = self._allow(methods)
        if request.method == "OPTIONS":
            return self.preflight(request, allow)
        return _text(405, "method not allowed", [(b"Allow", allow)])

    def refuse_early(
        self, method: str, path: str, headers: dict[str, str], peer: Peer
    ) -> tuple[int, str, Headers] | None:
        """What a request would be refused with (status, message, headers),
        judged from its head alone (for ``Expect: 100-continue``: a refusal
        instead of the invitation to send the body). None when it may go on,
        or when only dispatch can tell (static files, preflights)."""
        methods = self.routes.get(path)
        if methods is None:
            return None if self._static is not None else (404, "not found", [])
        if method == "OPTIONS":
            return None
        handler = methods.get(method)
        if handler is None:
            return (405, "method not allowed", [(b"Allow", self._allow(methods))])
        if method in STATE_CHANGING:
            refused = self.cross_site(headers)
            if refused is not None:
                return (403, refused, [])
        if handler == self.publish:
            why = self.may_publish(Request(method, path, "", headers, b"", False, peer))
            if why is not None:
                if self.config.publish_key:
                    return (401, why, [(b"WWW-Authenticate", b'Bearer realm="gochan"')])
                return (403, why, [])
        return None

    @staticmethod
    def _allow(methods: dict[str, Handler]) -> bytes:
        return ", ".join([*methods, "OPTIONS"]).encode()

    def cross_site(self, headers: dict[str, str]) -> str | None:
        """Why a state-changing request is refused as cross-site, or None.
        An ``Origin`` must be the server's own (same host and port as the
        ``Host``) or in ``cors_origins``; requests without one (servers,
        curl) pass. A keyless loopback server also wants a loopback
        ``Host`` (or one in ``allowed_hosts``), so a rebound DNS name
        cannot reach it."""
        host = headers.get("host", "")
        if self.keyless_loopback and not self._local_host(host):
            return f"Host {host[:64]!r} is not a loopback name (see allowed_hosts)"
        origin = headers.get("origin")
        if origin is None or origin in self._origins or "*" in self._origins:
            return None
        if origin != "null":
            try:
                parts = urlsplit(origin)
            except ValueError:
                parts = None
            if parts is not None and parts.scheme in ("http", "https") and parts.netloc == host:
                return None
        return f"Origin {origin[:64]!r} is not allowed (see cors_origins)"

    @property
    def keyless_loopback(self) -> bool:
        return self.trust_loopback and self.check_publishers and not self.config.publish_key

    def _local_host(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        if name in self._hosts or host.lower() in self._hosts:
            return True
        if name in LOOPBACK_NAMES or name.endswith(".localhost"):
            return True
        try:  # an IP literal, strictly: "127.0.0.1.nip.io" is a name anyone can point
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def cors(self, request: Request) -> list[tuple[bytes, bytes]]:
        origin = request.headers.get("origin")
        if not origin or not self._origins:
            return []
        if "*" in self._origins:
            return [(b"Access-Control-Allow-Origin", b"*")]
        if origin in self._origins:
            return [
                (b"Access-Control-Allow-Origin", origin.encode("latin-1")),
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Vary", b"Origin"),
            ]
        return []

    def preflight(self, request: Request, allow: bytes) -> Response:
        headers = [(b"Allow", allow)]
        if self.cors(request):
            headers += [
                (b"Access-Control-Allow-Methods", allow),
                (b"Access-Control-Allow-Headers", b"Content-Type, Authorization, Last-Event-ID"),
                (b"Access-Control-Max-Age", b"%d" % PREFLIGHT_MAX_AGE_S),
            ]
        return Response(204, b"", headers)

    # -- GET /events -------------------------------------------------------

    def events(self, request: Request) -> Reply | Awaitable[Reply]:
        try:
            query = request.query()
        except ValueError as exc:
            return _text(400, exc)
        client_id = (query.get("id") or [""])[0]
        named = query.get("topic", ())
        if len(named) > self.config.max_topics_per_client:
            return _text(400, self._too_many_topics())
        try:
            topics = self.streamer.check_topics(named)
        except InvalidTopicError as exc:
            return _text(400, exc)
        client: Client | None
        if client_id:
            try:
                validate_client_id(client_id)
            except InvalidClientIdError as exc:
                return _text(400, exc)
            client = self.streamer.get_client(client_id)
            if client is None:
                return _text(401, "Invalid client ID")
        elif not self.config.auto_create_clients:
            return _text(401, "Invalid client ID")
        else:
            client = None
        if request.method == "HEAD":
            # The stream's headers, less its Connection: the head's own says
            # keep-alive or close, as the request asked.
            return Response(200, b"", [h for h in SSE_HEADERS if h[0] != b"Connection"], None)
        created = client is None
        if client is None:
            try:
                client = self.streamer.create_client(request.peer)
            except PeerLimitError as exc:
                retry = b"%d" % max(1, int(self.config.client_ttl))
                return _text(429, exc, [(b"Retry-After", retry)])
            except LimitExceededError as exc:
                return _text(503, exc)
        last_id = request.headers.get("last-event-id") or (query.get("last_event_id") or [""])[0]
        if topics:
            try:
                subscribed = self.streamer.add_held_topics(client, topics)
            except LimitExceededError as exc:
                if created:  # a refused connect leaves nothing behind
                    self.streamer.discard_client(client)
                return _text(400, exc)
            if not subscribed:  # a topic the broker must subscribe to first
                return self._subscribe_then_stream(client, topics, last_id, created)
        return self._open_stream(client, [], last_id)

    async def _subscribe_then_stream(
        self, client: Client, topics: list[str], last_id: str, created: bool
    ) -> Reply:
        try:
            errors = await self.streamer.update_subscriptions(client, add=topics)
        except LimitExceededError as exc:
            if created and not client.topic_count and not client.streams:
                self.streamer.discard_client(client)
            return _text(400, exc)
        except (UnknownClientError, ClosedError):
            return _text(401, "Invalid client ID")
        failures = [subscription_failure_frame(e.topic, e.message) for e in errors]
        return self._open_stream(client, failures, last_id)

    def _open_stream(self, client: Client, extra_frames: list[bytes], last_id: str) -> OpenStream:
        config = self.config
        parts = [b"retry: %d\n" % config.retry_ms] if config.retry_ms else []
        parts.append(first_frame(client.id, config.client_ttl, client.topics))
        parts.extend(extra_frames)
        return OpenStream(client, list(SSE_HEADERS), b"".join(parts), last_id)

    # -- POST /update_subscriptions ----------------------------------------

    def update_subscriptions(self, request: Request) -> Reply | Awaitable[Reply]:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return _text(400, "malformed JSON body")
        if not isinstance(body, dict):
            return _text(400, "the body must be a JSON object")
        client_id = body.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            return _text(400, "missing client_id")
        lists = []
        for key in ("add", "remove"):
            value = body.get(key, [])
            if value is None:
                value = []
            if not isinstance(value, list):
                return _text(400, f"{key} must be a list of strings")
            if len(value) > self.config.max_topics_per_client:
                # Before any topic is looked at: validating 100,000 would stall the loop.
                return _text(400, self._too_many_topics())
            if not all(isinstance(t, str) for t in value):
                return _text(400, f"{key} must be a list of strings")
            lists.append(value)
        client = self.streamer.get_client(client_id)
        if client is None:
            return _text(400, "Invalid Client ID")
        try:
            self.streamer.check_topics(lists[0] + lists[1])
        except InvalidTopicError as exc:
            return _text(400, exc)
        return self._update(client, lists[0], lists[1])

    async def _update(self, client: Client, add: list[str], remove: list[str]) -> Reply:
        try:
            errors = await self.streamer.update_subscriptions(client, add, remove)
        except LimitExceededError as exc:
            return _text(400, exc)
        except UnknownClientError:
            return _text(400, "Invalid Client ID")
        return _json(
            200,
            {
                "client_id": client.id,
                "subscriptions": client.topics,
                "errors": [e.as_dict() for e in errors],
            },
        )

    def _too_many_topics(self) -> str:
        return f"a client may hold at most {self.config.max_topics_per_client} topics"

    # -- POST /publish -----------------------------------------------------

    def may_publish(self, request: Request) -> str | None:
        """None if ``request`` may publish, else why not."""
        if not self.check_publishers:
            return None
        key = self.config.publish_key
        if not key:
            if self.trust_loopback and is_loopback_host(request.peer):
                return None
            return "publishing needs a key: set publish_key (GOCHAN_PUBLISH_KEY)" + self.no_key_hint
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        # Header values are read as Latin-1, which keeps their bytes: the key
        # is compared as the UTF-8 bytes a client sends.
        if scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), key.encode("utf-8")
        ):
            return None
        return "missing or wrong publish key (Authorization: Bearer <key>)"

    def publish(self, request: Request) -> Reply | Awaitable[Reply]:
        refused = self.may_publish(request)
        if refused is not None:
            status = 403 if not self.config.publish_key else 401
            headers = [(b"WWW-Authenticate", b'Bearer realm="gochan"')] if status == 401 else []
            return _text(status, refused, headers)
        try:
            topic, data = self._read_publish(request)
        except ValueError as exc:
            return _text(400, exc)
        try:
            self.streamer.check_topics((topic,))
        except InvalidTopicError as exc:
            return _text(400, exc)
        if self.streamer.can_publish_nowait:
            try:
                event_id = self.streamer.publish_nowait(topic, data)
            except ClosedError as exc:
                return _text(503, exc)
            return _json(200, {"id": event_id})
        return self._publish(topic, data)

    async def _publish(self, topic: str, data: bytes) -> Reply:
        try:
            event_id = await self.streamer.publish(topic, data)
        except (BrokerError, ClosedError) as exc:
            server_logger.warning("publish to %r failed: %s", topic, exc)
            return _text(503, f"publish failed: {exc}")
        except LimitExceededError as exc:  # e.g. a body over the broker's size limit
            return _text(413, exc)
        except InterfaceError as exc:  # e.g. a body the broker cannot carry
            return _text(400, exc)
        status = 200 if event_id is not None else 202
        return _json(status, {"id": event_id})

    def _read_publish(self, request: Request) -> tuple[str, bytes]:
        qs = request.query_string
        if qs.startswith("topic=") and not any(c in qs for c in "&%+"):
            return qs[6:], request.body  # the common ?topic=T, nothing to unquote
        query = request.query()
        if "topic" in query:
            if len(query["topic"]) > 1:
                raise ValueError("one topic per publish (the query names several)")
            return query["topic"][0], request.body
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            try:
                form = parse_qs(
                    request.body.decode("utf-8"),
                    keep_blank_values=True,
                    max_num_fields=16,
                    errors="strict",
                )
            except (UnicodeDecodeError, ValueError):
                raise ValueError("malformed form body") from None
            if "topic" not in form:
                raise ValueError("missing topic")
            if len(form["topic"]) > 1 or len(form.get("data", ())) > 1:
                raise ValueError("one topic and one data per publish (the form names several)")
            return form["topic"][0], form.get("data", [""])[0].encode()
        if ctype in ("application/json", ""):
            try:
                body = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                raise ValueError("give ?topic=, a form, or a JSON body") from None
            if not isinstance(body, dict) or not isinstance(body.get("topic"), str):
                raise ValueError('the JSON body must be {"topic": "...", "data": ...}')
            data = body.get("data", "")
            if isinstance(data, str):
                return body["topic"], data.encode()
            return body["topic"], orjson.dumps(data)
        raise ValueError("missing topic: give ?topic=, a form, or a JSON body")

    # -- operations --------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        return _text(200, "ok")

    def readyz(self, request: Request) -> Response:
        if self.streamer.ready:
            return _text(200, "ready")
        return _text(503, "driver not ready")

    def metrics(self, request: Request) -> Response:
        # OpenMetrics when the Accept header asks for it, Prometheus text otherwise.
        body, content_type = self.exposition(request.headers.get("accept", ""))
        return Response(200, body, [(b"Vary", b"Accept")], content_type.encode("latin-1"))

    def client_js(self, request: Request) -> Response:
        """The browser client (an ES module), so pages can import it from gochan."""
        try:
            body = _client_js()
        except OSError:
            return _text(404, "gochan.js is not installed")
        headers = [(b"Cache-Control", b"public, max-age=300")]
        return Response(200, body, headers, b"text/javascript; charset=utf-8")

    def static(self, request: Request) -> Response:
        """A file under ``static_dir`` (``index.html`` for a directory)."""
        assert self._static is not None
        try:
            relative = unquote(request.path, errors="strict").lstrip("/")
        except UnicodeDecodeError:
            return _text(400, "the path is not valid UTF-8 once unescaped")
        if "\x00" in relative:
            return _text(404, "not found")
        target = (self._static / relative).resolve()
        if target != self._static and self._static not in target.parents:
            return _text(404, "not found")  # outside the directory: ../ tricks
        if target.is_dir():
            target = target / "index.html"
        try:
            body = target.read_bytes()
        except OSError:
            return _text(404, "not found")
        ctype = guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return Response(200, body, [(b"Cache-Control", b"no-cache")], ctype.encode())
