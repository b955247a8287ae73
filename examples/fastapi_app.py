"""A FastAPI app that serves gochan under /realtime behind its own login.

gochan's endpoints (/realtime/events, /realtime/update_subscriptions,
/realtime/publish, ...) speak gochan's protocol unchanged; the app in front
decides who gets in:

- every /realtime request needs a user: ``Authorization: Bearer <token>``, or
  the ``session`` cookie that ``POST /login`` sets (an ``EventSource`` cannot
  send headers, but it sends cookies);
- /realtime/publish also needs the ``publish`` permission, so gochan's own
  publish key is off (``publish_key_required=False``);
- the app's own routes use the same users through a FastAPI dependency, and
  publish with the embedding API (``POST /api/announce``).

Run it from the repository root (``pip install fastapi 'uvicorn[standard]'``)::

    EXAMPLE_TOKENS='alice-token=alice:publish,bob-token=bob' \\
        uvicorn examples.fastapi_app:app --no-server-header

    curl -N -H 'Authorization: Bearer bob-token' \\
        'http://127.0.0.1:8000/realtime/events?topic=news'
    curl -H 'Authorization: Bearer alice-token' \\
        'http://127.0.0.1:8000/realtime/publish?topic=news' -d 'hello'

or open http://127.0.0.1:8000/ and log in with a token. Without
``EXAMPLE_TOKENS`` the two demo users above exist: fine on your machine only.
gochan's settings come from ``GOCHAN_*`` variables (``GOCHAN_DRIVER=nats`` ...).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse

from gochan import Config, Streamer
from gochan.asgi import GochanASGI, Receive, Scope, Send

SESSION_COOKIE = "session"
PUBLISH = "publish"  # the permission (Starlette "scope") needed to publish
DEMO_TOKENS = "alice-token=alice:publish,bob-token=bob"


@dataclass(frozen=True)
class User(BaseUser):
    name: str
    permissions: frozenset[str] = frozenset()

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name


def parse_tokens(spec: str) -> dict[str, User]:
    """``token=name[:perm[:perm]],...`` -> {token: User}."""
    users = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        token, _, rest = item.partition("=")
        name, *perms = rest.split(":")
        if not token or not name:
            raise ValueError(f"bad token entry {item!r}: want token=name[:perm]")
        users[token] = User(name, frozenset(perms))
    return users


class TokenAuth(AuthenticationBackend):
    """A bearer token, else the session cookie (which holds a token here; a
    real app would keep a signed session id)."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self.users = dict(users)

    def find(self, token: str) -> User | None:
        found = None
        for known, user in self.users.items():  # no early exit: constant time
            if secrets.compare_digest(token.encode(), known.encode()):
                found = user
        return found

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            token = conn.cookies.get(SESSION_COOKIE, "")
        if not token:
            return None  # anonymous: the routes decide
        user = self.find(token.strip())
        if user is None:
            raise AuthenticationError("unknown token")
        return AuthCredentials(["authenticated", *sorted(user.permissions)]), user


def auth_failed(conn: HTTPConnection, exc: AuthenticationError) -> PlainTextResponse:
    return PlainTextResponse(str(exc), 401, {"WWW-Authenticate": 'Bearer realm="example"'})


class LoginRequired:
    """ASGI guard in front of a mounted app: 401 for anonymous requests, 403
    for publishing without the permission. FastAPI dependencies do not run
    for mounted apps, so the check is plain ASGI on what the middleware found.
    CORS preflights (OPTIONS) carry no credentials and pass."""

    def __init__(self, app: GochanASGI) -> None:
        self.app = app
        self.publish_path = app.config.publish_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS":
            conn = HTTPConnection(scope)
            refusal: Response | None = None
            if not conn.user.is_authenticated:
                refusal = PlainTextResponse(
                    "login required\n", 401, {"WWW-Authenticate": 'Bearer realm="example"'}
                )
            elif self._route(scope) == self.publish_path and PUBLISH not in conn.auth.scopes:
                refusal = PlainTextResponse("not allowed to publish\n", 403)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _route(scope: Scope) -> str:
        path: str = scope["path"]
        return path.removeprefix(scope.get("root_path", "")) or "/"


class Login(BaseModel):
    token: str


class Announcement(BaseModel):
    text: str


def current_user(request: Request) -> User:
    user = request.user
    if not isinstance(user, User):
        raise HTTPException(401, "login required", {"WWW-Authenticate": "Bearer"})
    return user


def publisher(user: Annotated[User, Depends(current_user)]) -> User:
    if PUBLISH not in user.permissions:
        raise HTTPException(403, "not allowed to publish")
    return user


PAGE = """<!doctype html>
<meta charset="utf-8"><title>gochan under FastAPI</title>
<form id="login"><input name="token" placeholder="token"> <button>log in</button></form>
<pre id="log"></pre>
<script>
const log = (line) => document.getElementById("log").append(line + "\\n");
document.getElementById("login").onsubmit = async (event) => {
  event.preventDefault();
  const token = new FormData(event.target).get("token");
  const r = await fetch("/login", {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: JSON.stringify({token})});
  if (!r.ok) return log("login failed");
  const events = new EventSource("/realtime/events?topic=announcements&topic=news");
  events.addEventListener("message", (e) => log("system: " + e.data));
  for (const topic of ["announcements", "news"])
    events.addEventListener(topic, (e) => log(topic + ": " + e.data));
};
</script>
"""


def create_app(
    users: Mapping[str, User] | None = None, streamer: Streamer | None = None
) -> FastAPI:
    """The app; ``users`` maps tokens to users (default: ``EXAMPLE_TOKENS``),
    ``streamer`` is configured from ``GOCHAN_*`` variables by default."""
    if users is None:
        users = parse_tokens(os.environ.get("EXAMPLE_TOKENS", DEMO_TOKENS))
    if streamer is None:
        streamer = Streamer(Config.from_sources())
    # The app's middleware decides who publishes: gochan's key check is off.
    realtime = GochanASGI(streamer, publish_key_required=False)
    app = FastAPI(
        title="gochan under FastAPI",
        lifespan=realtime.lifespan,  # starts the Streamer, ends streams, closes it
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenAuth(users), on_error=auth_failed)
        ],
    )
    app.state.streamer = streamer
    app.state.realtime = realtime
    app.mount("/realtime", LoginRequired(realtime))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/login", status_code=204)
    async def login(body: Login, response: Response) -> None:
        if TokenAuth(users).find(body.token) is None:
            raise HTTPException(401, "unknown token")
        response.set_cookie(SESSION_COOKIE, body.token, httponly=True, samesite="strict")

    @app.get("/api/me")
    async def me(user: Annotated[User, Depends(current_user)]) -> dict[str, object]:
        return {"name": user.name, "permissions": sorted(user.permissions)}

    @app.post("/api/announce")
    async def announce(
        body: Announcement, user: Annotated[User, Depends(publisher)]
    ) -> dict[str, str | None]:
        event_id = await streamer.publish("announcements", f"{user.name}: {body.text}")
        return {"id": event_id}

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, server_header=False)
