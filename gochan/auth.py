"""Authorization: who is asking, and which topics they may hold and publish to.

The contract is one hook, ``authorize(request) -> Grant``, that the
:class:`~gochan.Streamer` (and the ASGI adapter) run before every
``/events``, ``/update_subscriptions`` and ``/publish``. It sees an
:class:`AuthRequest` (method, path, query, headers, cookies, peer) and
returns a :class:`Grant` (the identity ``sub``, the subscribe and publish
:class:`TopicPatterns`, the expiry ``exp``), or raises :class:`AuthError`
with the HTTP status and reason of the refusal. It may be a plain function
or a coroutine function.

:class:`JWTAuthorizer` is the standard hook: a JWT (RFC 7519) verified with
PyJWT, read from ``Authorization: Bearer``, the ``gochan_token`` cookie, or
the ``access_token`` query parameter when that is enabled, with the claims
``sub``, ``exp`` and ``"gochan": {"subscribe": [...], "publish": [...]}``.
It is built from the ``jwt_*`` settings of :class:`~gochan.Config`
(:meth:`JWTAuthorizer.from_config`). A token is never logged.
"""

from __future__ import annotations

import bisect
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import HMAC_ALGORITHMS, Config
from .errors import AuthError, ConfigurationError

__all__ = [
    "AuthError",
    "AuthRequest",
    "Authorize",
    "Grant",
    "JWTAuthorizer",
    "TopicPatterns",
    "bearer_token",
    "parse_cookies",
    "same_secret",
]

if TYPE_CHECKING:
    import jwt

log = logging.getLogger("gochan.auth")

ACCESS_TOKEN_PARAM = "access_token"
CLAIMS_KEY = "gochan"  # {"subscribe": [patterns], "publish": [patterns]}
WILDCARD = "*"
# How often a JWKS file is read again (a few KB): keys added by a
# rotation are used, and keys removed are no longer trusted, within this.
JWKS_RECHECK_S = 1.0
REASON_CHARS = 200  # a verification error, as the 401 answer says it
# Grants of tokens verified already, by the token's exact text, until their
# exp: a page's update calls and publishes, and its stream's reconnections,
# send the same token again, and PyJWT takes ~130 us to verify one.
VERIFIED_TOKENS_KEPT = 2048
# HMAC secrets shorter than the hash are refused (RFC 7518 section 3.2).
MIN_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}


def _jwt() -> Any:
    """PyJWT, imported when authorization is first configured: with it off,
    gochan does not pay for loading it and the cryptography package."""
    import jwt

    return jwt


def same_secret(given: str, expected: str) -> bool:
    """``given == expected`` in constant time. Header values are read as
    Latin-1, which keeps their bytes, so ``given`` is compared as the bytes
    a client sent and ``expected`` as its UTF-8 bytes."""
    try:
        raw = given.encode("latin-1")
    except UnicodeEncodeError:
        raw = given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(raw, expected.encode("utf-8"))


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``, or ""."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def parse_cookies(header: str) -> dict[str, str]:
    """``Cookie: a=1; b=2`` as ``{"a": "1", "b": "2"}`` (the first of a
    repeated name wins, as browsers send the most specific first)."""
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, eq, value = part.partition("=")
        name = name.strip()
        if eq and name and name not in cookies:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies[name] = value
    return cookies


class AuthRequest:
    """What the hook sees of a request. ``query`` and ``cookies`` are parsed
    when first read. Header names are lower-case."""

    __slots__ = ("_cookies", "_query", "headers", "method", "path", "peer", "query_string")

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: Mapping[str, str],
        peer: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.peer = peer  # the peer's IP address, "" where it is not known
        self._query: dict[str, list[str]] | None = None
        self._cookies: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's fields; ValueError if it is malformed."""
        if self._query is None:
            from .server.http import parse_query  # the server's parser; it imports us

            self._query = parse_query(self.query_string)
        return self._query

    @property
    def cookies(self) -> dict[str, str]:
        if self._cookies is None:
            self._cookies = parse_cookies(self.headers.get("cookie", ""))
        return self._cookies

    def __repr__(self) -> str:  # no headers: they may carry a token
        return f"<AuthRequest {self.method} {self.path} peer={self.peer!r}>"


class TopicPatterns:
    """A set of topic patterns: exact topics, and prefixes ending in ``*``
    (``user.42.*``; ``*`` alone is every topic). No pattern, no topic.

    ``allows`` is a set lookup plus one binary search: prefixes covered by a
    shorter one are dropped, so the only prefix that can match a topic is
    the greatest one not above it."""

    __slots__ = ("everything", "exact", "patterns", "prefixes")

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        if isinstance(patterns, str):
            raise TypeError("patterns must be a list of strings, not one string")
        listed = list(patterns)
        for pattern in listed:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"a topic pattern must be a non-empty string, got {pattern!r}")
        self.patterns = tuple(listed)
        self.everything = WILDCARD in listed
        self.exact = frozenset(p for p in listed if not p.endswith(WILDCARD))
        prefixes: list[str] = []
        for prefix in sorted({p[:-1] for p in listed if p.endswith(WILDCARD)}):
            if not (prefixes and prefix.startswith(prefixes[-1])):
                prefixes.append(prefix)  # sorted: a covering prefix comes first
        self.prefixes = tuple(prefixes)

    def allows(self, topic: str) -> bool:
        if self.everything or topic in self.exact:
            return True
        prefixes = self.prefixes
        i = bisect.bisect_right(prefixes, topic)
        return i > 0 and topic.startswith(prefixes[i - 1])

    def refused(self, topics: Iterable[str]) -> list[str]:
        """The ``topics`` not allowed, in order."""
        if self.everything:
            return []
        return [t for t in topics if not self.allows(t)]

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def __repr__(self) -> str:
        return f"TopicPatterns({list(self.patterns)!r})"


class Grant:
    """What an authorized request may do: its identity ``sub``, the topics
    it may subscribe and publish to, and when that ends (``exp``, seconds
    since the epoch; None: never). A stream opened with it ends at ``exp``."""

    __slots__ = ("exp", "publish", "sub", "subscribe")

    def __init__(
        self,
        sub: str,
        subscribe: Iterable[str] | TopicPatterns = (),
        publish: Iterable[str] | TopicPatterns = (),
        exp: float | None = None,
    ) -> None:
        if not isinstance(sub, str) or not sub:
            raise ValueError("a grant needs an identity: sub must be a non-empty string")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, (int, float))):
            raise ValueError(f"exp must be a number of seconds since the epoch, got {exp!r}")
        self.sub = sub
        self.subscribe = _patterns(subscribe)
        self.publish = _patterns(publish)
        self.exp = None if exp is None else float(exp)

    def __repr__(self) -> str:
        return (
            f"Grant(sub={self.sub!r}, subscribe={list(self.subscribe.patterns)!r}, "
            f"publish={list(self.publish.patterns)!r}, exp={self.exp!r})"
        )


def _patterns(value: Iterable[str] | TopicPatterns) -> TopicPatterns:
    return value if isinstance(value, TopicPatterns) else TopicPatterns(value)


Authorize = Callable[[AuthRequest], "Grant | Awaitable[Grant]"]


# -- JWT ---------------------------------------------------------------------


class JWTAuthorizer:
    """The ``authorize`` hook for JWTs. ``key``: an HMAC secret (HS*), or a
    public key in PEM (RS*, ES*, PS*, EdDSA); ``jwks``: keys by ``kid``
    (``{kid: (key, algorithm)}``), for tokens whose header names one;
    ``jwks_file``: where they were read from, read again when it changes.
    Raises :class:`AuthError` (401) for a missing or invalid token."""

    def __init__(
        self,
        key: str | bytes | Any = None,
        *,
        algorithms: Iterable[str] = ("HS256",),
        jwks: Mapping[str, tuple[Any, str]] | None = None,
        jwks_file: str = "",
        audience: str = "",
        issuer: str = "",
        cookie: str = "gochan_token",
        query_param: bool = False,
    ) -> None:
        self.key = key
        self.algorithms = list(algorithms)
        self.jwks = dict(jwks or {})  # kid -> (key, algorithm)
        self.jwks_file = jwks_file
        self.jwks_recheck_s = JWKS_RECHECK_S
        self._jwks_seen = _contents(jwks_file) if jwks_file else None
        self._jwks_checked = time.monotonic()
        if key is None and not self.jwks:
            raise ConfigurationError("a JWT authorizer needs a key or a JWKS")
        self.audience = audience or None
        self.issuer = issuer or None
        self.cookie = cookie
        self.query_param = query_param
        required = ["sub"]
        if self.audience:
            required.append("aud")
        if self.issuer:
            required.append("iss")
        self._options: Any = {"require": required}
        self._verified: dict[str, Grant] = {}
        self._jwt = _jwt()
        self._decoder: jwt.PyJWT = self._jwt.PyJWT()

    @classmethod
    def from_config(cls, config: Config) -> JWTAuthorizer | None:
        """The authorizer ``config`` asks for (None when neither ``jwt_key``
        nor ``jwt_jwks_file`` is set). Key files are read now: a bad one is
        a ConfigurationError naming the setting, never showing a secret."""
        if not config.jwt_key and not config.jwt_jwks_file:
            return None
        algorithms = config.jwt_algorithms
        key: Any = None
        if config.jwt_key:
            if set(algorithms) <= HMAC_ALGORITHMS:
                secret = config.jwt_key.encode("utf-8")
                need = max(MIN_HMAC_KEY_BYTES.get(a, 32) for a in algorithms)
                if len(secret) < need:
                    raise ConfigurationError(
                        f"jwt_key: an HMAC secret for {', '.join(algorithms)} must be at "
                        f"least {need} bytes, got {len(secret)}"
                    )
                key = secret
            else:
                key = _load_pem(config.jwt_key)
        jwks = _load_jwks(config.jwt_jwks_file, algorithms) if config.jwt_jwks_file else None
        return cls(
            key,
            algorithms=algorithms,
            jwks=jwks,
            jwks_file=config.jwt_jwks_file,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            cookie=config.jwt_cookie,
            query_param=config.jwt_query_param,
        )

    def token(self, request: AuthRequest) -> str:
        """The request's token: bearer header, then cookie, then (when
        enabled) the query parameter; "" if none."""
        token = bearer_token(request.headers)
        if token:
            return token
        if "cookie" in request.headers:
            token = request.cookies.get(self.cookie, "")
            if token:
                return token
        if self.query_param:
            try:
                return (request.query.get(ACCESS_TOKEN_PARAM) or [""])[0]
            except ValueError:
                return ""
        return ""

    def __call__(self, request: AuthRequest) -> Grant:
        token = self.token(request)
        if not token:
            raise AuthError(401, "a token is required (Authorization: Bearer <jwt>)")
        if self.jwks_file and time.monotonic() >= self._jwks_checked + self.jwks_recheck_s:
            self._reload_jwks()  # first: it may drop what was verified with a removed key
        verified = self._verified
        grant = verified.get(token)
        if grant is not None:
            if grant.exp is None or grant.exp > time.time():
                return grant
            del verified[token]  # expired: verify() says so
        grant = grant_from_claims(self.verify(token))
        if len(verified) >= VERIFIED_TOKENS_KEPT:
            del verified[next(iter(verified))]  # the oldest
        verified[token] = grant
        return grant

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, verified; AuthError(401) otherwise."""
        jwt = self._jwt
        try:
            key, algorithms = self._key_for(token)
            claims: dict[str, Any] = self._decoder.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "invalid token: it has expired") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            # PyJWT's messages name the check that failed, never the token.
            raise AuthError(401, f"invalid token: {str(exc)[:REASON_CHARS]}") from None
        return claims

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        jwt = self._jwt
        if self.jwks:
            kid = jwt.get_unverified_header(token).get("kid")
            if kid is not None:
                found = self.jwks.get(kid) if isinstance(kid, str) else None
                if found is None:
                    raise jwt.InvalidKeyError("no key with this kid")
                return found[0], [found[1]]
        if self.key is None:
            raise jwt.InvalidKeyError("the token's header names no kid")
        return self.key, self.algorithms

    def _reload_jwks(self) -> None:
        """Read the JWKS file again if it changed. A file that became
        unreadable or invalid is logged and the keys read before are kept."""
        self._jwks_checked = time.monotonic()
        # Its bytes, not its mtime: two writes within a clock tick share one.
        seen = _contents(self.jwks_file)
        if seen is None or seen == self._jwks_seen:
            return
        self._jwks_seen = seen
        try:
            self.jwks = _load_jwks(self.jwks_file, self.algorithms)
        except ConfigurationError as exc:
            log.warning("%s; the keys read before are kept", exc)
            return
        self._verified.clear()  # a token of a key removed is no longer valid
        log.info("jwt_jwks_file: read again, %d keys", len(self.jwks))


def _contents(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


def grant_from_claims(claims: Mapping[str, Any]) -> Grant:
    """The grant of verified JWT claims; AuthError(401) when they are malformed."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError(401, "invalid token: sub must be a non-empty string")
    rights = claims.get(CLAIMS_KEY, {})
    if not isinstance(rights, dict):
        raise AuthError(401, f"invalid token: the {CLAIMS_KEY!r} claim must be an object")
    lists = []
    for name in ("subscribe", "publish"):
        value = rights.get(name, [])
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            raise AuthError(
                401, f"invalid token: {CLAIMS_KEY}.{name} must be a list of topic patterns"
            )
        lists.append(value)
    exp = claims.get("exp")
    return Grant(sub, lists[0], lists[1], exp if isinstance(exp, (int, float)) else None)


def _load_pem(path: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"jwt_key: cannot read the PEM public key file: {exc.strerror}"
        ) from None
    try:
        return load_pem_public_key(data)
    except ValueError:
        raise ConfigurationError(
            f"jwt_key: {path!r} is not a PEM public key (-----BEGIN PUBLIC KEY-----)"
        ) from None


def _load_jwks(path: str, algorithms: list[str]) -> dict[str, tuple[Any, str]]:
    """``{kid: (key, algorithm)}`` of a JWKS file, for keys whose algorithm
    is among ``algorithms`` (others are skipped, with a warning)."""
    jwt = _jwt()
    try:
        text = Path(path).read_text(encoding="utf-8")
        document = json.loads(text)
    except OSError as exc:
        raise ConfigurationError(f"jwt_jwks_file: cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigurationError(f"jwt_jwks_file: {path!r} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigurationError(f'jwt_jwks_file: {path!r} has no "keys" list')
    keys: dict[str, tuple[Any, str]] = {}
    for n, entry in enumerate(entries):
        kid = entry.get("kid") if isinstance(entry, dict) else None
        if not isinstance(kid, str) or not kid:
            raise ConfigurationError(f"jwt_jwks_file: key {n} has no kid")
        if kid in keys:
            raise ConfigurationError(f"jwt_jwks_file: kid {kid!r} appears twice")
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"jwt_jwks_file: key {kid!r}: {exc}") from None
        algorithm = jwk.algorithm_name
        if algorithm not in algorithms:
            log.warning("jwt_jwks_file: key %r (%s) skipped: not in jwt_algorithms", kid, algorithm)
            continue
        keys[kid] = (jwk.key, algorithm)
    if not keys:
        raise ConfigurationError(
            f"jwt_jwks_file: {path!r} has no key for jwt_algorithms ({', '.join(algorithms)})"
        )
    return keys
