"""The endpoints: what each path answers. Handlers return None when they have
answered already, or an awaitable when they must wait on the broker."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson

from .._fast import encode_system
from ..client import Client, validate_client_id
from ..errors import (
    BrokerError,
    ClosedError,
    InterfaceError,
    InvalidClientIdError,
    InvalidTopicError,
    LimitExceededError,
    UnknownClientError,
)
from ..log import server_logger
from ..streamer import subscription_failure_frame
from .http import JSON, TEXT, Request, response_head, simple_response

if TYPE_CHECKING:
    from .app import Server
    from .protocol import HttpProtocol

__all__ = ["Router"]

Handler = Callable[["HttpProtocol", Request], Awaitable[None] | None]

SSE_HEADERS = (
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache, no-store, must-revalidate, pre-check=0, post-check=0"),
    (b"Connection", b"keep-alive"),
    (b"X-Accel-Buffering", b"no"),
)
PREFLIGHT_MAX_AGE_S = 600


class Router:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.streamer = server.streamer
        self.config = config = server.config
        # path -> {method: handler}
        self.routes: dict[str, dict[str, Handler]] = {
            config.events_path: {"GET": self.events, "HEAD": self.events},
            config.update_path: {"POST": self.update_subscriptions},
            config.publish_path: {"POST": self.publish},
            config.healthz_path: {"GET": self.healthz, "HEAD": self.healthz},
            config.readyz_path: {"GET": self.readyz, "HEAD": self.readyz},
            config.metrics_path: {"GET": self.metrics, "HEAD": self.metrics},
        }
        self._origins = set(config.cors_origins)

    # -- dispatch ----------------------------------------------------------

    def dispatch(self, proto: HttpProtocol, request: Request) -> Awaitable[None] | None:
        methods = self.routes.get(request.path)
        if methods is None:
            return self.reply(proto, request, 404, b"not found\n")
        handler = methods.get(request.method)
        if handler is not None:
            return handler(proto, request)
        allow = ", ".join([*methods, "OPTIONS"]).encode()
        if request.method == "OPTIONS":
            return self.preflight(proto, request, allow)
        return self.reply(proto, request, 405, b"method not allowed\n", [(b"Allow", allow)])

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

    def reply(
        self,
        proto: HttpProtocol,
        request: Request,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = TEXT,
    ) -> None:
        proto.respond(
            simple_response(
                status,
                body,
                content_type=content_type,
                headers=(headers or []) + self.cors(request),
                keep_alive=request.keep_alive,
                head=request.method == "HEAD",
            ),
            request,
        )
        return None

    def reply_json(self, proto: HttpProtocol, request: Request, status: int, data: Any) -> None:
        return self.reply(proto, request, status, orjson.dumps(data), content_type=JSON)

    def preflight(self, proto: HttpProtocol, request: Request, allow: bytes) -> None:
        headers = [(b"Allow", allow)]
        if self.cors(request):
            headers += [
                (b"Access-Control-Allow-Methods", allow),
                (b"Access-Control-Allow-Headers", b"Content-Type, Authorization, Last-Event-ID"),
                (b"Access-Control-Max-Age", b"%d" % PREFLIGHT_MAX_AGE_S),
            ]
        return self.reply(proto, request, 204, b"", headers)

    # -- GET /events -------------------------------------------------------

    def events(self, proto: HttpProtocol, request: Request) -> Awaitable[None] | None:
        query = request.query()
        client_id = (query.get("id") or [""])[0]
        try:
            topics = self.streamer.check_topics(query.get("topic", ()))
        except InvalidTopicError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        client: Client | None
        if client_id:
            try:
                validate_client_id(client_id)
            except InvalidClientIdError as exc:
                return self.reply(proto, request, 400, f"{exc}\n".encode())
            client = self.streamer.get_client(client_id)
            if client is None:
                return self.reply(proto, request, 401, b"Invalid client ID\n")
        elif not self.config.auto_create_clients:
            return self.reply(proto, request, 401, b"Invalid client ID\n")
        else:
            client = None
        if request.method == "HEAD":
            head = [*SSE_HEADERS, *self.cors(request)]
            return proto.respond(response_head(200, head, keep_alive=request.keep_alive), request)
        if client is None:
            try:
                client = self.streamer.create_client()
            except LimitExceededError as exc:
                return self.reply(proto, request, 503, f"{exc}\n".encode())
        last_id = request.headers.get("last-event-id") or (query.get("last_event_id") or [""])[0]
        if topics and any(not client.has_topic(t) for t in topics):
            return self._subscribe_then_stream(proto, request, client, topics, last_id)
        self._open_stream(proto, request, client, [], last_id)
        return None

    async def _subscribe_then_stream(
        self,
        proto: HttpProtocol,
        request: Request,
        client: Client,
        topics: list[str],
        last_id: str,
    ) -> None:
        try:
            errors = await self.streamer.update_subscriptions(client, add=topics)
        except LimitExceededError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        except (UnknownClientError, ClosedError):
            return self.reply(proto, request, 401, b"Invalid client ID\n")
        failures = [subscription_failure_frame(e.topic, e.message) for e in errors]
        self._open_stream(proto, request, client, failures, last_id)
        return None

    def _open_stream(
        self,
        proto: HttpProtocol,
        request: Request,
        client: Client,
        extra_frames: list[bytes],
        last_id: str,
    ) -> None:
        config = self.config
        first = {
            "config": {"client_id": client.id, "client_ttl_millis": int(config.client_ttl * 1000)},
            "subscriptions": client.topics,
        }
        parts = [response_head(200, [*SSE_HEADERS, *self.cors(request)], keep_alive=True)]
        if config.retry_ms:
            parts.append(b"retry: %d\n" % config.retry_ms)
        parts.append(encode_system(orjson.dumps(first)))
        parts.extend(extra_frames)
        if last_id:
            # No history is kept yet: say so rather than pretend (PROTOCOL.md).
            self.streamer.counters["replay_misses"] += 1
            replay = {"replay": {"last_event_id": last_id[:256], "recovered": False}}
            parts.append(encode_system(orjson.dumps(replay)))
        proto.start_stream(b"".join(parts), client)

    # -- POST /update_subscriptions ----------------------------------------

    def update_subscriptions(self, proto: HttpProtocol, request: Request) -> Awaitable[None] | None:
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return self.reply(proto, request, 400, b"malformed JSON body\n")
        if not isinstance(body, dict):
            return self.reply(proto, request, 400, b"the body must be a JSON object\n")
        client_id = body.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            return self.reply(proto, request, 400, b"missing client_id\n")
        lists = []
        for key in ("add", "remove"):
            value = body.get(key, [])
            if value is None:
                value = []
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                return self.reply(
                    proto, request, 400, f"{key} must be a list of strings\n".encode()
                )
            lists.append(value)
        client = self.streamer.get_client(client_id)
        if client is None:
            return self.reply(proto, request, 400, b"Invalid Client ID\n")
        try:
            self.streamer.check_topics(lists[0] + lists[1])
        except InvalidTopicError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        return self._update(proto, request, client, lists[0], lists[1])

    async def _update(
        self,
        proto: HttpProtocol,
        request: Request,
        client: Client,
        add: list[str],
        remove: list[str],
    ) -> None:
        try:
            errors = await self.streamer.update_subscriptions(client, add, remove)
        except LimitExceededError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        except UnknownClientError:
            return self.reply(proto, request, 400, b"Invalid Client ID\n")
        return self.reply_json(
            proto,
            request,
            200,
            {
                "client_id": client.id,
                "subscriptions": client.topics,
                "errors": [e.as_dict() for e in errors],
            },
        )

    # -- POST /publish -----------------------------------------------------

    def _may_publish(self, request: Request) -> str | None:
        """None if allowed, else why not."""
        key = self.config.publish_key
        if not key:
            if self.config.loopback_only:
                return None
            return "publishing needs a key: set publish_key (GOCHAN_PUBLISH_KEY)"
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return None
        return "missing or wrong publish key (Authorization: Bearer <key>)"

    def publish(self, proto: HttpProtocol, request: Request) -> Awaitable[None] | None:
        refused = self._may_publish(request)
        if refused is not None:
            status = 403 if not self.config.publish_key else 401
            headers = [(b"WWW-Authenticate", b'Bearer realm="gochan"')] if status == 401 else []
            return self.reply(proto, request, status, f"{refused}\n".encode(), headers)
        try:
            topic, data = self._read_publish(request)
        except ValueError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        try:
            self.streamer.check_topics((topic,))
        except InvalidTopicError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        if self.streamer.can_publish_nowait:
            try:
                event_id = self.streamer.publish_nowait(topic, data)
            except ClosedError as exc:
                return self.reply(proto, request, 503, f"{exc}\n".encode())
            return self.reply_json(proto, request, 200, {"id": event_id})
        return self._publish(proto, request, topic, data)

    async def _publish(
        self, proto: HttpProtocol, request: Request, topic: str, data: bytes
    ) -> None:
        try:
            event_id = await self.streamer.publish(topic, data)
        except (BrokerError, ClosedError) as exc:
            server_logger.warning("publish to %r failed: %s", topic, exc)
            return self.reply(proto, request, 503, f"publish failed: {exc}\n".encode())
        except InterfaceError as exc:
            return self.reply(proto, request, 400, f"{exc}\n".encode())
        status = 200 if event_id is not None else 202
        return self.reply_json(proto, request, status, {"id": event_id})

    def _read_publish(self, request: Request) -> tuple[str, bytes]:
        query = request.query()
        if "topic" in query:
            return query["topic"][0], request.body
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded":
            try:
                form = parse_qs(
                    request.body.decode("utf-8"), keep_blank_values=True, max_num_fields=16
                )
            except (UnicodeDecodeError, ValueError):
                raise ValueError("malformed form body") from None
            if "topic" not in form:
                raise ValueError("missing topic")
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

    def healthz(self, proto: HttpProtocol, request: Request) -> None:
        return self.reply(proto, request, 200, b"ok\n")

    def readyz(self, proto: HttpProtocol, request: Request) -> None:
        if self.streamer.ready:
            return self.reply(proto, request, 200, b"ready\n")
        return self.reply(proto, request, 503, b"driver not ready\n")

    def metrics(self, proto: HttpProtocol, request: Request) -> None:
        return self.reply(
            proto,
            request,
            200,
            self.server.metrics_text().encode(),
            content_type=b"text/plain; version=0.0.4; charset=utf-8",
        )
