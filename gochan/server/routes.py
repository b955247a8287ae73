"""The endpoints: what each path answers.

Handlers know nothing of sockets: they take a :class:`Request` and return a
:class:`Response` or an :class:`OpenStream`, or an awaitable of one when they
must wait on the broker. The raw protocol and the ASGI adapter render them.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from mimetypes import guess_type
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from ..auth import Authorize, AuthRequest, Grant, bearer_token, same_secret
from ..client import Client, TopicError, validate_client_id
from ..config import Config
from ..errors import (
    AuthError,
    BatchPublishError,
    BrokerError,
    ClosedError,
    ClusterTimeoutError,
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
    token_exp: float | None = None  # the stream ends when its token expires


Reply = Response | OpenStream
Handler = Callable[[Request], Reply | Awaitable[Reply]]

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache, no-store, must-revalidate, pre-check=0, post-check=0"),
    (b"Connection", b"keep-alive"),
    (b"X-Accel-Buffering", b"no"),
)
# HEAD /events: the stream's headers, less its Connection (the head's own
# says keep-alive or close, as the request asked).
HEAD_HEADERS = tuple(h for h in SSE_HEADERS if h[0] != b"Connection")
PREFLIGHT_MAX_AGE_S = 600
# Distinct Host values whose loopback check is remembered (a bounded table:
# past it, it is emptied).
HOST_ANSWERS_KEPT = 1024
# Methods that change state: a cross-site page must not be able to send them
# (a form or text/plain fetch needs no preflight).
STATE_CHANGING = frozenset(("POST", "PUT", "PATCH", "DELETE"))
LOOPBACK_NAMES = frozenset(("localhost", "localhost.", "ip6-localhost"))
BEARER_CHALLENGE = ((b"WWW-Authenticate", b'Bearer realm="gochan"'),)
FORBIDDEN_TOPIC = "not allowed to subscribe to this topic"
NDJSON = "application/x-ndjson"
# A JSON body that is an array: a batch publish (JSON's own whitespace first).
JSON_ARRAY_START = re.compile(rb"[ \t\r\n]*\[")


def _text(status: int, message: object, headers: Headers | None = None) -> Response:
    return Response(status, f"{message}\n".encode(), headers or [])


def _challenge(status: int) -> Headers | None:
    """The ``WWW-Authenticate`` a 401 carries (a fresh list: answers own theirs)."""
    return list(BEARER_CHALLENGE) if status == 401 else None


def _uncounted(reason: str) -> None:
    pass


def _json(status: int, data: Any) -> Response:
    return Response(status, orjson.dumps(data), [], JSON)


def _message_data(data: object) -> bytes:
    """A JSON publish's ``data`` as sent: a string as it is, any other value
    as its JSON."""
    return data.encode() if isinstance(data, str) else orjson.dumps(data)


def _content_type(request: Request) -> str:
    """The media type of the body, lower-case, without its parameters."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


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
        authorize: Authorize | None = None,
        refuse: Callable[[str], None] = _uncounted,
    ) -> None:
        """``trust_loopback``: the server listens on loopback addresses only
        (the Server sets it from the addresses it bound; behind ASGI it
        cannot be known). Then, without a publish_key, loopback peers may
        publish, if their request names a loopback Host (DNS rebinding) and
        comes from no foreign Origin. ``check_publishers=False``: the host
        application authorizes publishers. ``metrics``: the scraper's Accept
        header in, the /metrics page and its Content-Type out. ``authorize``:
        the hook run before /events, /update_subscriptions and /publish (see
        :mod:`gochan.auth`); None: authorization off. ``refuse(reason)``
        counts a refusal (:meth:`Metrics.refuse`)."""
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
        self.authorize = authorize
        self.refuse = refuse
        if authorize is not None:
            # Only the guarded routes change: with authorization off the
            # request path is exactly what it was.
            for path in (config.events_path, config.update_path, config.publish_path):
                methods = self.routes[path]
                for method, handler in methods.items():
                    methods[method] = self._guard(handler, authorize)
        self._origins = set(config.cors_origins)
        self._hosts = {h.lower() for h in config.allowed_hosts}
        self._host_answers: dict[str, bool] = {}  # Host value -> _judge_host's answer
        self._static = Path(config.static_dir).resolve() if config.static_dir else None
        # A cluster node names itself on its streams and update answers, so
        # what a load balancer spread can be tied to a node (curl -i, logs).
        cluster = streamer.cluster
        self._node: Headers = (
            [(b"X-Gochan-Node", cluster.node_id.encode())] if cluster is not None else []
        )

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
        if path == self.config.publish_path and self.authorize is None:
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
        return self._cross_site(headers.get("host", ""), headers.get("origin"))

    def _cross_site(self, host: str, origin: str | None) -> str | None:
        if self.keyless_loopback and not self._local_host(host):
            return f"Host {host[:64]!r} is not a loopback name (see allowed_hosts)"
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
        """Whether ``host`` (a Host header) names this machine's loopback, or
        a name in allowed_hosts. Remembered per distinct value: parsing an IP
        literal with ``ipaddress`` cost 11 of the 59 us of server CPU per
        published message (bench/profiles/notifications.md), and publishers
        send the same Host every time."""
        known = self._host_answers.get(host)
        if known is None:
            if len(self._host_answers) >= HOST_ANSWERS_KEPT:
                self._host_answers.clear()  # a stranger's many Host values: start over
            known = self._host_answers[host] = self._judge_host(host)
        return known

    def _judge_host(self, host: str) -> bool:
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
            headers = [
                (b"Access-Control-Allow-Origin", origin.encode("latin-1")),
                (b"Access-Control-Allow-Credentials", b"true"),
                (b"Vary", b"Origin"),
            ]
            if self.authorize is not None:  # gochan.js tells a refused token by it
                headers.append((b"Access-Control-Expose-Headers", b"WWW-Authenticate"))
            return headers
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

    # -- authorization -----------------------------------------------------

    def _guard(self, handler: Handler, authorize: Authorize) -> Handler:
        """``handler`` run once ``authorize`` has granted the request (its
        grant in ``request.grant``), or the refusal. A publish with the
        publish_key is a server-side publisher's: it needs no token."""
        publishing = handler == self.publish

        def guarded(request: Request) -> Reply | Awaitable[Reply]:
            if publishing and self.has_publish_key(request.headers):
                return handler(request)
            view = AuthRequest(
                request.method, request.path, request.query_string, request.headers, request.peer
            )
            try:
                granted = authorize(view)
            except AuthError as exc:
                return self._auth_refusal(exc)
            if isinstance(granted, Grant):
                request.grant = granted
                return handler(request)
            return self._granted_later(granted, handler, request)

        return guarded

    async def _granted_later(
        self, pending: Awaitable[Grant] | object, handler: Handler, request: Request
    ) -> Reply:
        if not inspect.isawaitable(pending):
            raise TypeError(f"authorize must return a Grant, not {type(pending).__name__}")
        try:
            granted = await pending
        except AuthError as exc:
            return self._auth_refusal(exc)
        if not isinstance(granted, Grant):
            raise TypeError(f"authorize must return a Grant, not {type(granted).__name__}")
        request.grant = granted
        reply = handler(request)
        if not isinstance(reply, (Response, OpenStream)):
            reply = await reply
        return reply

    def _auth_refusal(self, exc: AuthError) -> Response:
        self.refuse("unauthorized" if exc.status == 401 else "forbidden")
        return _text(exc.status, exc.reason, _challenge(exc.status))

    def has_publish_key(self, headers: dict[str, str]) -> bool:
        """The request carries the publish_key (``Authorization: Bearer``)."""
        key = self.config.publish_key
        return bool(key) and same_secret(bearer_token(headers), key)

    def _stream_refusal(self, client: Client | None, identity: str | None) -> Response | None:
        """429 when one more stream would pass the client's or the
        identity's share, else None."""
        config = self.config
        if client is not None and len(client.streams) >= config.max_streams_per_client:
            self.refuse("streams_per_client")
            return _text(
                429,
                f"too many streams for this client "
                f"(max_streams_per_client={config.max_streams_per_client})",
            )
        if identity is not None and (
            self.streamer.identity_streams(identity) >= config.max_streams_per_identity
        ):
            self.refuse("streams_per_identity")
            return _text(
                429,
                f"too many streams for this identity "
                f"(max_streams_per_identity={config.max_streams_per_identity})",
            )
        return None

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
        grant = request.grant
        identity = None
        if grant is not None:
            refused = grant.subscribe.refused(topics)
            if refused:
                self.refuse("forbidden")
                return _text(403, f"not allowed to subscribe to {refused[0]!r}")
            identity = grant.sub
        client: Client | None
        if client_id:
            try:
                validate_client_id(client_id)
            except InvalidClientIdError as exc:
                return _text(400, exc)
            if self.streamer.cluster is not None:
                return self._events_in_cluster(request, client_id, topics, grant, query)
            client = self.streamer.get_client(client_id)
            # Another identity's client is answered as an unknown one: ids
            # can neither be taken over nor probed.
            if client is None or client.identity != identity:
                return _text(401, "Invalid client ID")
        elif not self.config.auto_create_clients:
            return _text(401, "Invalid client ID")
        else:
            client = None
        if request.method == "HEAD":
            return Response(200, b"", [*HEAD_HEADERS, *self._node], None)
        last_id = request.headers.get("last-event-id") or (query.get("last_event_id") or [""])[0]
        return self._connect(client, topics, last_id, grant, request.peer)

    @property
    def connects_fast(self) -> bool:
        """A connect that names topics only may skip the request object
        (:meth:`events_fast`): no hook authorizes it, and a connect
        without an id makes a client."""
        routes = self.routes[self.config.events_path]
        return routes.get("GET") == self.events and self.config.auto_create_clients

    def events_fast(self, peer: Peer, named: list[str]) -> Reply | Awaitable[Reply] | None:
        """GET /events whose query names topics and nothing else, and whose
        head carries nothing :meth:`events` reads (the connect fast path,
        protocol.py): what events() answers it. None, with nothing done,
        when a topic is not valid or there are too many: events() then
        says why."""
        if len(named) > self.config.max_topics_per_client:
            return None
        try:
            topics = self.streamer.check_topics(named)
        except InvalidTopicError:
            return None
        return self._connect(None, topics, "", None, peer)

    def _connect(
        self,
        client: Client | None,
        topics: list[str],
        last_id: str,
        grant: Grant | None,
        peer: Peer,
    ) -> Reply | Awaitable[Reply]:
        """Open a stream for ``client`` (None: a new one, made for ``peer``)
        subscribed to ``topics`` too, once the broker holds them."""
        identity = grant.sub if grant is not None else None
        if identity is not None or (
            client is not None and len(client.streams) >= self.config.max_streams_per_client
        ):
            refusal = self._stream_refusal(client, identity)
            if refusal is not None:
                return refusal
        created = client is None
        if client is None:
            try:
                client = self.streamer.create_client(peer, identity)
            except PeerLimitError as exc:
                retry = b"%d" % max(1, int(self.config.client_ttl))
                return _text(429, exc, [(b"Retry-After", retry)])
            except LimitExceededError as exc:
                return _text(503, exc)
        # Topics the client holds that this token does not allow go first,
        # so neither replay nor live delivery carries them.
        drop = grant.subscribe.refused(client.topics) if grant is not None and not created else ()
        if topics or drop:
            try:
                subscribed = not drop and self.streamer.add_held_topics(client, topics)
            except LimitExceededError as exc:
                if created:  # a refused connect leaves nothing behind
                    self.streamer.discard_client(client)
                return _text(400, exc)
            if not subscribed:  # a topic the broker must subscribe to first
                return self._subscribe_then_stream(client, topics, drop, last_id, created, grant)
        if created and self.streamer.cluster is not None:
            return self._subscribe_then_stream(client, [], (), last_id, created, grant)
        return self._open_stream(client, [], last_id, grant)

    async def _events_in_cluster(
        self,
        request: Request,
        client_id: str,
        topics: list[str],
        grant: Grant | None,
        query: dict[str, list[str]],
    ) -> Reply:
        """GET /events?id= on a cluster node: the client may have been made
        on any node; its record in the cluster store says whose it is and
        what it holds."""
        identity = grant.sub if grant is not None else None
        cluster = self.streamer.cluster
        assert cluster is not None
        try:
            if request.method == "HEAD":
                found = await cluster.lookup(client_id, identity)
                if found is None:
                    return _text(401, "Invalid client ID")
                return Response(200, b"", [*HEAD_HEADERS, *self._node], None)
            client = await self.streamer.attach_client(client_id, identity)
        except LimitExceededError as exc:
            return _text(503, exc)
        except (BrokerError, ClosedError) as exc:
            return _text(503, f"cluster store: {exc}")
        if client is None:
            return _text(401, "Invalid client ID")
        refusal = self._stream_refusal(client, identity)
        if refusal is not None:
            return refusal
        last_id = request.headers.get("last-event-id") or (query.get("last_event_id") or [""])[0]
        drop = grant.subscribe.refused(client.topics) if grant is not None else ()
        return await self._subscribe_then_stream(client, topics, drop, last_id, False, grant)

    async def _subscribe_then_stream(
        self,
        client: Client,
        topics: list[str],
        drop: list[str] | tuple[()],
        last_id: str,
        created: bool,
        grant: Grant | None,
    ) -> Reply:
        errors: list[TopicError] = []
        try:
            if created and topics:  # checked (events, events_fast); nothing to drop
                errors = await self.streamer.add_checked_topics(client, topics)
            elif topics or drop:
                errors = await self.streamer.update_subscriptions(client, add=topics, remove=drop)
            if created:
                await self.streamer.register_client(client)
        except LimitExceededError as exc:
            if created and not client.topic_count and not client.streams:
                self.streamer.discard_client(client)
            return _text(400, exc)
        except (UnknownClientError, ClosedError):
            return _text(401, "Invalid client ID")
        except ClusterTimeoutError as exc:
            return _text(504, exc)
        except BrokerError as exc:  # the cluster store's: the broker's are in errors
            if created:
                await self.streamer.remove_client(client)
            return _text(503, f"cluster store: {exc}")
        # Other streams may have opened while the broker answered.
        refusal = self._stream_refusal(client, client.identity)
        if refusal is not None:
            if created:
                await self.streamer.remove_client(client)
            return refusal
        failures = [subscription_failure_frame(e.topic, e.message) for e in errors]
        return self._open_stream(client, failures, last_id, grant)

    def _open_stream(
        self, client: Client, extra_frames: list[bytes], last_id: str, grant: Grant | None
    ) -> OpenStream:
        config = self.config
        parts = [b"retry: %d\n" % config.retry_ms] if config.retry_ms else []
        parts.append(first_frame(client.id, config.client_ttl, client.topics))
        parts.extend(extra_frames)
        token_exp = grant.exp if grant is not None else None
        headers = [*SSE_HEADERS, *self._node]
        return OpenStream(client, headers, b"".join(parts), last_id, token_exp)

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
        grant = request.grant
        identity = grant.sub if grant is not None else None
        # Another identity's client is answered as an unknown one (a cluster
        # node asks the store, in _update_in_cluster).
        cluster = self.streamer.cluster is not None
        client = None if cluster else self.streamer.get_client(client_id)
        if not cluster and (client is None or client.identity != identity):
            return _text(400, "Invalid Client ID")
        try:
            self.streamer.check_topics(lists[0] + lists[1])
        except InvalidTopicError as exc:
            return _text(400, exc)
        add, forbidden = lists[0], []
        if grant is not None:
            refused = grant.subscribe.refused(add)
            if refused:  # refused in errors; the rest applies
                self.refuse("forbidden")
                denied = dict.fromkeys(refused)
                add = [t for t in add if t not in denied]
                forbidden = [TopicError(t, "forbidden", FORBIDDEN_TOPIC) for t in denied]
        if cluster:
            return self._update_in_cluster(client_id, identity, add, lists[1], forbidden)
        assert client is not None
        return self._update(client, add, lists[1], forbidden)

    async def _update_in_cluster(
        self,
        client_id: str,
        identity: str | None,
        add: list[str],
        remove: list[str],
        forbidden: list[TopicError],
    ) -> Reply:
        """An update answered by any node: written to the client's record,
        applied on the streams of every node holding one, then answered."""
        cluster = self.streamer.cluster
        assert cluster is not None
        try:
            topics, errors = await cluster.update(
                client_id, identity, self.streamer.check_topics(add),
                self.streamer.check_topics(remove),
            )  # fmt: skip
        except LimitExceededError as exc:
            return _text(400, exc)
        except UnknownClientError:
            return _text(400, "Invalid Client ID")
        except ClusterTimeoutError as exc:
            return _text(504, exc)
        except (BrokerError, ClosedError) as exc:
            return _text(503, f"cluster store: {exc}")
        answer = {
            "client_id": client_id,
            "subscriptions": topics,
            "errors": [e.as_dict() for e in forbidden + errors],
        }
        return Response(200, orjson.dumps(answer), list(self._node), JSON)

    async def _update(
        self, client: Client, add: list[str], remove: list[str], forbidden: list[TopicError]
    ) -> Reply:
        try:
            errors = forbidden + await self.streamer.update_subscriptions(client, add, remove)
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
        return self._publisher_refusal(request.peer, request.headers)

    def _publisher_refusal(self, peer: Peer, headers: dict[str, str]) -> str | None:
        if not self.check_publishers:
            return None
        key = self.config.publish_key
        if not key:
            if self.trust_loopback and is_loopback_host(peer):
                return None
            return "publishing needs a key: set publish_key (GOCHAN_PUBLISH_KEY)" + self.no_key_hint
        if self.has_publish_key(headers):
            return None
        return "missing or wrong publish key (Authorization: Bearer <key>)"

    def publish(self, request: Request) -> Reply | Awaitable[Reply]:
        grant = request.grant
        if grant is None:
            refused = self.may_publish(request)
            if refused is not None:
                status = 403 if not self.config.publish_key else 401
                return _text(status, refused, _challenge(status))
        if not request.query_string.startswith("topic=") and self._is_batch(request):
            return self.publish_batch(request)
        try:
            topic, data = self._read_publish(request)
        except ValueError as exc:
            return _text(400, exc)
        try:
            self.streamer.check_topics((topic,))
        except InvalidTopicError as exc:
            return _text(400, exc)
        if grant is not None:
            if not grant.publish.allows(topic):
                self.refuse("forbidden")
                return _text(403, f"not allowed to publish to {topic!r}")
            wait = self.streamer.publish_buckets.take(grant.sub)
            if wait:
                self.refuse("publish_rate")
                retry = b"%d" % self.streamer.publish_buckets.retry_after(wait)
                return _text(
                    429,
                    f"too many publishes for this identity "
                    f"(publish_rate_per_identity={self.config.publish_rate_per_identity:g}/s)",
                    [(b"Retry-After", retry)],
                )
        if self.streamer.can_publish_nowait:
            try:
                event_id = self.streamer.publish_nowait(topic, data)
            except ClosedError as exc:
                return _text(503, exc)
            return _json(200, {"id": event_id})
        return self._publish(topic, data)

    @property
    def publishes_fast(self) -> bool:
        """Whether a plain ``?topic=`` publish can be answered by
        :meth:`publish_fast`: no authorization hook (the JWT's grant is the
        slow path's) and a driver that publishes without awaiting."""
        return self.authorize is None and self.streamer.can_publish_nowait

    def publish_fast(
        self,
        peer: Peer,
        topic: str,
        body: bytes,
        host: str,
        origin: str | None,
        authorization: str | None,
    ) -> bytes | Response | None:
        """The publish the protocol's fast path read (``POST <publish_path>
        ?topic=<topic>``, keep-alive, with only these headers of interest),
        exactly as :meth:`dispatch` and :meth:`publish` would take it: the
        JSON body of its 200 answer, another answer once the message was
        handed to the streamer (503: closed), or None when it is anything
        but a plain success up to there (a refusal, a bad topic, an answer
        with CORS headers). None means nothing has been done: the slow path
        reads the same request and answers it."""
        if self._cross_site(host, origin) is not None:
            return None
        if origin and self._origins and ("*" in self._origins or origin in self._origins):
            return None  # cors() gives this answer headers: not the prebuilt one
        headers = {"authorization": authorization} if authorization is not None else {}
        if self._publisher_refusal(peer, headers) is not None:
            return None
        try:  # publish_nowait checks the topic before it does anything
            event_id = self.streamer.publish_nowait(topic, body)
        except InvalidTopicError:
            return None
        except ClosedError as exc:
            return _text(503, exc)
        return orjson.dumps({"id": event_id})

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

    # -- POST /publish, a batch ---------------------------------------------

    def _is_batch(self, request: Request) -> bool:
        """Whether ``request`` is a batch publish: NDJSON, or a JSON body that
        is an array, and no ``?topic=`` (then the body is one raw message)."""
        ctype = _content_type(request)
        if ctype != NDJSON and (
            ctype not in ("application/json", "") or not JSON_ARRAY_START.match(request.body)
        ):
            return False
        try:
            return "topic" not in request.query()
        except ValueError:
            return False  # _read_publish says what is wrong with the query

    def publish_batch(self, request: Request) -> Reply | Awaitable[Reply]:
        """Many messages in one request, each ``{"topic", "data"}``: all
        checked (format, topics, grant, rate) before any is published."""
        batch = self._read_batch(request)
        if isinstance(batch, Response):
            return batch
        grant = request.grant
        if grant is not None and batch:
            for i, (topic, _) in enumerate(batch):
                if not grant.publish.allows(topic):
                    self.refuse("forbidden")
                    return _text(403, f"message {i}: not allowed to publish to {topic!r}")
            buckets = self.streamer.publish_buckets
            if len(batch) > buckets.burst:
                self.refuse("publish_rate")
                return _text(
                    413,
                    f"a batch of {len(batch)} messages is more than one identity may publish "
                    f"at once (publish_burst={buckets.burst})",
                )
            wait = buckets.take(grant.sub, len(batch))
            if wait:
                self.refuse("publish_rate")
                return _text(
                    429,
                    f"too many publishes for this identity: {len(batch)} messages "
                    f"(publish_rate_per_identity={self.config.publish_rate_per_identity:g}/s)",
                    [(b"Retry-After", b"%d" % buckets.retry_after(wait))],
                )
        if self.streamer.can_publish_many_nowait:
            try:
                ids = self.streamer.publish_many_nowait(batch)
            except (BatchPublishError, ClosedError) as exc:
                return self._batch_failure(exc)
            return _json(200, {"ids": ids})
        return self._publish_many(batch)

    async def _publish_many(self, batch: list[tuple[str, bytes]]) -> Reply:
        try:
            ids = await self.streamer.publish_many(batch)
        except (BatchPublishError, ClosedError) as exc:
            return self._batch_failure(exc)
        return _json(200 if None not in ids else 202, {"ids": ids})

    def _batch_failure(self, exc: BatchPublishError | ClosedError) -> Response:
        """503 with the ids of what was published before the driver failed:
        a batch is never acknowledged with some of it lost."""
        ids = exc.ids if isinstance(exc, BatchPublishError) else []
        error = exc.error if isinstance(exc, BatchPublishError) else exc
        server_logger.warning("batch publish failed after %d messages: %s", len(ids), error)
        return _json(503, {"ids": ids, "error": f"publish failed at message {len(ids)}: {error}"})

    def _read_batch(self, request: Request) -> list[tuple[str, bytes]] | Response:
        """The (topic, data) of each message of a batch, or the refusal
        naming the first bad one (indices count from 0, as in the answer)."""
        limit = self.config.max_batch_messages
        too_many = f"a batch carries at most {limit} messages (max_batch_messages)"
        items: list[tuple[str, Any]] = []  # (where, the parsed message)
        if _content_type(request) == NDJSON:
            for number, line in enumerate(request.body.split(b"\n"), 1):
                if not line or line.isspace():
                    continue  # blank lines (a final newline) carry nothing
                where = f"message {len(items)} (line {number})"
                if len(items) == limit:
                    return _text(413, too_many)
                try:
                    items.append((where, orjson.loads(line)))
                except orjson.JSONDecodeError:
                    return _text(400, f"{where}: not JSON")
        else:
            try:
                array = orjson.loads(request.body)
            except orjson.JSONDecodeError:
                return _text(400, "malformed JSON array")
            if len(array) > limit:
                return _text(413, too_many)
            items = [(f"message {i}", item) for i, item in enumerate(array)]
        batch: list[tuple[str, bytes]] = []
        for where, item in items:
            if not isinstance(item, dict) or not isinstance(item.get("topic"), str):
                return _text(400, f'{where}: must be {{"topic": "...", "data": ...}}')
            batch.append((item["topic"], _message_data(item.get("data", ""))))
        try:
            self.streamer.check_topics([topic for topic, _ in batch])
        except InvalidTopicError:
            for (where, _), (topic, _) in zip(items, batch, strict=True):
                try:
                    self.streamer.check_topics((topic,))
                except InvalidTopicError as exc:
                    return _text(400, f"{where}: {exc}")
            raise  # not one of them alone: cannot happen
        return batch

    def _read_publish(self, request: Request) -> tuple[str, bytes]:
        qs = request.query_string
        if qs.startswith("topic=") and not any(c in qs for c in "&%+"):
            return qs[6:], request.body  # the common ?topic=T, nothing to unquote
        query = request.query()
        if "topic" in query:
            if len(query["topic"]) > 1:
                raise ValueError("one topic per publish (the query names several)")
            return query["topic"][0], request.body
        ctype = _content_type(request)
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
            return body["topic"], _message_data(body.get("data", ""))
        raise ValueError("missing topic: give ?topic=, a form, or a JSON body")

    # -- operations --------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        return _text(200, "ok")

    def readyz(self, request: Request) -> Response:
        cluster = self.streamer.cluster
        if cluster is None:
            if self.streamer.ready:
                return _text(200, "ready")
            return _text(503, "driver not ready")
        # A cluster node names itself and says what it sees of the store.
        view = (
            f"node {cluster.node_id}; cluster store {cluster.store.url} "
            f"{'up' if cluster.store.ready else 'DOWN'}; nodes {' '.join(cluster.live_nodes())}"
        )
        if self.streamer.ready:
            return _text(200, f"ready\n{view}")
        why = "driver not ready" if not self.streamer.driver.ready else "cluster store not ready"
        return _text(503, f"{why}\n{view}")

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
