"""A FastAPI app that serves gochan under /realtime behind its own login.

gochan's endpoints (/realtime/events, /realtime/update_subscriptions,
/realtime/publish, ...) speak gochan's protocol unchanged. The app's login
decides who gets in, and gochan's ``authorize`` hook (:mod:`gochan.auth`)
turns that login into an identity and the topics it may use:

- a user is ``Authorization: Bearer <token>``, or the ``session`` cookie that
  ``POST /login`` sets (an ``EventSource`` cannot send headers, but it sends
  cookies); /realtime/events, /update_subscriptions and /publish without one
  are refused with 401;
- every user may subscribe to the public topics (``news``,
  ``announcements``, anything under ``public.``) and to their own private
  ones, ``user.<name>.*`` (bob's inbox is ``user.bob.inbox``); any other
  topic is refused: 403 at connect, ``forbidden`` in an update's errors;
- only users with the ``publish`` permission publish over HTTP, to those
  same topics; the others get 403;
- a client id belongs to the user whose stream created it: another user
  presenting it gets the answer an unknown id gets;
- the app's own routes use the same users through a FastAPI dependency and
  publish with the embedding API, which no grant limits: ``POST
  /api/announce`` (publishers, to ``announcements``) and ``POST
  /api/messages`` (any user, to the recipient's ``user.<to>.inbox``).

/realtime/healthz, /readyz, /metrics and /gochan.js stay open, as on gochan's
own server (the metrics hold counts, never topics, ids or users).

Run it from the repository root (``pip install fastapi 'uvicorn[standard]'``)::

    EXAMPLE_TOKENS='alice-token=alice:publish,bob-token=bob' \\
        uvicorn examples.fastapi_app:app --no-server-header

    curl -N -H 'Authorization: Bearer bob-token' \\
        'http://127.0.0.1:8000/realtime/events?topic=news&topic=user.bob.inbox'
    curl -H 'Authorization: Bearer alice-token' \\
        'http://127.0.0.1:8000/realtime/publish?topic=news' -d 'hello'
    curl -H 'Authorization: Bearer alice-token' -H 'Content-Type: application/json' \\
        http://127.0.0.1:8000/api/messages -d '{"to": "bob", "text": "hi bob"}'

or open http://127.0.0.1:8000/ and log in with a token. Without
``EXAMPLE_TOKENS`` the two demo users above exist: fine on your machine only.
gochan's settings come from ``GOCHAN_*`` variables (``GOCHAN_DRIVER=nats`` ...).
"""

from __future__ import annotations

import os
import re
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

from gochan import AuthError, AuthRequest, Config, Grant, Streamer
from gochan.asgi import GochanASGI
from gochan.auth import bearer_token

SESSION_COOKIE = "session"
PUBLISH = "publish"  # the permission (Starlette "scope") needed to publish
DEMO_TOKENS = "alice-token=alice:publish,bob-token=bob"
PUBLIC_TOPICS = ("news", "announcements", "public.*")  # every user may read these
# A user's private topics are user.<name>.*. A name is letters, digits, - and _
# (no dot), so one user's prefix, user.bob., never covers another user's topics
# (it would cover all of user.bob.x.* for a user named "bob.x").
NAME = re.compile(r"[A-Za-z0-9_-]+")


def private_topics(name: str) -> str:
    """The pattern of ``name``'s own topics."""
    return f"user.{name}.*"


def inbox(name: str) -> str:
    return f"user.{name}.inbox"


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
        if not token or not NAME.fullmatch(name):
            raise ValueError(
                f"bad token entry {item!r}: want token=name[:perm], "
                "a name of letters, digits, - and _"
            )
        users[token] = User(name, frozenset(perms))
    return users


def grant_for(user: User) -> Grant:
    """What ``user`` may do in gochan: read the public topics and their own,
    publish to the same ones if they hold the ``publish`` permission."""
    topics = [*PUBLIC_TOPICS, private_topics(user.name)]
    return Grant(user.name, subscribe=topics, publish=topics if PUBLISH in user.permissions else [])


class TokenAuth(AuthenticationBackend):
    """A bearer token, else the session cookie (which holds a token here; a
    real app would keep a signed session id). The same lookup serves the
    app's routes (Starlette's ``authenticate``) and gochan's (``authorize``)."""

    def __init__(self, users: Mapping[str, User]) -> None:
        self.users = dict(users)
        self.grants = {user: grant_for(user) for user in self.users.values()}

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

    def authorize(self, request: AuthRequest) -> Grant:
        """gochan's hook: the logged-in user's grant, or 401. It runs before
        every /realtime/events, /update_subscriptions and /publish."""
        token = bearer_token(request.headers) or request.cookies.get(SESSION_COOKIE, "")
        user = self.find(token) if token else None
        if user is None:
            raise AuthError(401, "login required")
        return self.grants[user]


def auth_failed(conn: HTTPConnection, exc: AuthenticationError) -> PlainTextResponse:
    return PlainTextResponse(str(exc), 401, {"WWW-Authenticate": 'Bearer realm="example"'})


class Login(BaseModel):
    token: str


class Announcement(BaseModel):
    text: str


class Message(BaseModel):
    to: str
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
  const me = await (await fetch("/api/me")).json();
  const topics = ["announcements", "news", `user.${me.name}.inbox`];
  const query = topics.map((t) => "topic=" + encodeURIComponent(t)).join("&");
  const events = new EventSource("/realtime/events?" + query);
  events.addEventListener("message", (e) => log("system: " + e.data));
  for (const topic of topics) events.addEventListener(topic, (e) => log(topic + ": " + e.data));
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
    auth = TokenAuth(users)
    names = {user.name for user in auth.users.values()}
    # The hook decides who may subscribe and publish to what, and binds each
    # client id to its user.
    realtime = GochanASGI(streamer, authorize=auth.authorize)
    app = FastAPI(
        title="gochan under FastAPI",
        lifespan=realtime.lifespan,  # starts the Streamer, ends streams, closes it
        middleware=[Middleware(AuthenticationMiddleware, backend=auth, on_error=auth_failed)],
    )
    app.state.streamer = streamer
    app.state.realtime = realtime
    app.mount("/realtime", realtime)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.post("/login", status_code=204)
    async def login(body: Login, response: Response) -> None:
        if auth.find(body.token) is None:
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

    @app.post("/api/messages")
    async def message(
        body: Message, user: Annotated[User, Depends(current_user)]
    ) -> dict[str, str | None]:
        if body.to not in names:
            raise HTTPException(404, "no such user")
        event_id = await streamer.publish(inbox(body.to), f"{user.name}: {body.text}")
        return {"id": event_id}

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, server_header=False)
