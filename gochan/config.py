"""One configuration object for the streamer and the server.

Values come, lowest precedence first, from the defaults below, a YAML file
(``--config``), ``GOCHAN_*`` environment variables and command-line flags.
Every knob has a named default with its unit.

Driver options are not fixed here: they are the keyword arguments of the
chosen driver's constructor, set as ``--<driver>-<option>`` flags,
``GOCHAN_<DRIVER>_<OPTION>`` variables, or a ``<driver>:`` mapping in YAML,
whichever source names the driver.

Validation is hand-written and driven by the dataclass field types (and, for
driver options, by the constructor's annotations and defaults) rather than
done by a library such as pydantic: it is one ~100-line table of kinds and
ranges, it needs no new dependency for a package whose runtime needs are four
small libraries, and it gives exactly the one-line error gochan wants
(``port: expected an integer 0..65535, got 'abc'``) for YAML values, strings
from the environment or flags, and Python values passed to ``Config(...)``
alike, where pydantic's multi-line errors would have to be rewritten anyway.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigurationError

__all__ = ["FLAG_HELP", "Config", "describe", "load"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
DEFAULT_CLIENT_TTL_S = 60.0
DEFAULT_HEARTBEAT_S = 15.0
DEFAULT_RETRY_MS = 0  # 0: no "retry:" field, browsers use their own default
DEFAULT_MAX_CONNECTIONS = 50_000  # at most: see default_max_connections()
# File descriptors kept back from max_connections for the listener, broker
# connections, logs and static files, so gochan's own limit is met (and
# answered 503) before accept() fails with EMFILE and the kernel resets.
FD_RESERVE = 256
DEFAULT_MAX_CLIENTS = 100_000
# Per-peer shares (0, the default: this fraction of the global limit), so one
# address cannot lock every other out.
PEER_SHARE_DIVISOR = 10
DEFAULT_MAX_TOPICS_PER_CLIENT = 1024
DEFAULT_MAX_URL_BYTES = 8 * 1024
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_MESSAGES = 1000  # messages in one batch publish
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 75.0
DEFAULT_MAX_PENDING_BYTES = 1024 * 1024
DEFAULT_WRITE_BUFFER_HIGH_BYTES = 64 * 1024
# SO_SNDBUF of a stream socket. 64 KiB measured p50 21 ms / p99 70-98 ms at
# 500k deliveries/s (bench/compare.py --rates 3000,5000); 256 KiB 2-4 ms / 10-22 ms,
# like the kernel's autotuning, which lets a stuck reader pin megabytes.
DEFAULT_STREAM_SEND_BUFFER_BYTES = 256 * 1024
DEFAULT_MAX_FLUSH_DELAY_S = 0.0  # off: see max_flush_delay
DEFAULT_SHUTDOWN_GRACE_S = 5.0
DEFAULT_CLUSTER_NAME = "gochan"
DEFAULT_CLUSTER_TIMEOUT_S = 5.0  # an update waits this long for the other nodes
DEFAULT_WORKERS = 1  # processes serving the port (SO_REUSEPORT); 1: this process alone
# At shutdown each stream gets a "retry:" drawn uniformly from this window
# (seconds), so browsers do not all reconnect in the same second.
DEFAULT_SHUTDOWN_RETRY_MIN_S = 1.0
DEFAULT_SHUTDOWN_RETRY_MAX_S = 30.0
# New connections one peer address may open: a token bucket refilled at this
# rate (connections per second; 0: no limit) holding up to the burst.
DEFAULT_CONNECTION_RATE_PER_PEER = 100.0
DEFAULT_CONNECTION_BURST_PER_PEER = 200
DEFAULT_TICK_S = 0.5
DEFAULT_HISTORY_SIZE = 10_000  # messages kept for Last-Event-ID replay
DEFAULT_HISTORY_BYTES = 16 * 1024 * 1024
DEFAULT_HISTORY_AGE_S = 300.0

# Authorization (JWT) and the limits on one identity
DEFAULT_JWT_ALGORITHMS = ("HS256",)
DEFAULT_JWT_COOKIE = "gochan_token"
DEFAULT_MAX_STREAMS_PER_CLIENT = 16  # open streams of one client id
DEFAULT_MAX_STREAMS_PER_IDENTITY = 128  # open streams of one token identity (sub)
DEFAULT_PUBLISH_RATE_PER_IDENTITY = 100.0  # publishes per second per identity
DEFAULT_PUBLISH_BURST = 200  # publishes one identity may make at once
HMAC_ALGORITHMS = frozenset(("HS256", "HS384", "HS512"))
JWT_ALGORITHMS = HMAC_ALGORITHMS | {
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
}  # fmt: skip

LOG_LEVELS = ("debug", "info", "warning", "error")

# Range of each numeric field: (lowest, highest, whether lowest is excluded).
# A numeric field not listed here is >= 0.
_ABOVE_ZERO = (0, None, True)
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "port": (0, 65535, False),
    "workers": (1, None, False),
    **dict.fromkeys(
        (
            "client_ttl",
            "heartbeat",
            "max_connections",
            "max_clients",
            "max_topics_per_client",
            "max_pending_bytes",
            "write_buffer_high_bytes",
            "max_url_bytes",
            "max_header_bytes",
            "max_headers",
            "max_body_bytes",
            "max_batch_messages",
            "header_timeout",
            "keepalive_timeout",
            "connection_burst_per_peer",
            "max_streams_per_client",
            "max_streams_per_identity",
            "publish_rate_per_identity",
            "publish_burst",
            "cluster_timeout",
        ),
        _ABOVE_ZERO,
    ),
}
# Driver options with these names (the drivers' shared vocabulary of
# durations) must be above 0; the driver's constructor checks the rest.
_POSITIVE_OPTIONS = (
    "timeout",
    "_wait",
    "_wait_max",
    "_interval",
    "heartbeat",
    "reconnect_min",
    "reconnect_max",
    "_block",
    "keepalive",
    "pool_size",
    "_batch",
)
_SECRET_OPTIONS = ("password", "secret", "token", "key")


def fd_limit() -> int:
    """This process's soft RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or fewer where the fd limit is lower: the
    soft RLIMIT_NOFILE less FD_RESERVE (at least 1)."""
    limit = fd_limit()
    if limit == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, limit - FD_RESERVE))


@dataclass
class Config:
    """Everything gochan can be told. Field names are the YAML keys; the
    flag is ``--field-name`` and the variable ``GOCHAN_FIELD_NAME``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    driver: str = "mem"
    driver_options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"

    # Clients and streams
    client_ttl: float = DEFAULT_CLIENT_TTL_S
    heartbeat: float = DEFAULT_HEARTBEAT_S
    retry_ms: int = DEFAULT_RETRY_MS
    auto_create_clients: bool = True
    # Open TCP connections, streams included; by default derived from the fd
    # limit (see default_max_connections).
    max_connections: int = field(default_factory=default_max_connections)
    max_clients: int = DEFAULT_MAX_CLIENTS
    # One peer address's share: connections, and clients it made by
    # connecting without an id (0: a tenth of the global limit). Behind a
    # reverse proxy every connection comes from the proxy: raise them.
    max_connections_per_peer: int = 0
    max_clients_per_peer: int = 0
    max_topics_per_client: int = DEFAULT_MAX_TOPICS_PER_CLIENT
    max_streams_per_client: int = DEFAULT_MAX_STREAMS_PER_CLIENT
    # With authorization on: open streams of one identity, and its publishes
    # (a token bucket: rate per second, burst at once).
    max_streams_per_identity: int = DEFAULT_MAX_STREAMS_PER_IDENTITY
    publish_rate_per_identity: float = DEFAULT_PUBLISH_RATE_PER_IDENTITY
    publish_burst: int = DEFAULT_PUBLISH_BURST
    max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES
    write_buffer_high_bytes: int = DEFAULT_WRITE_BUFFER_HIGH_BYTES
    # Kernel send buffer of a stream socket (0: the kernel's autotuning). It
    # bounds what a reader that stopped reading pins in the kernel.
    stream_send_buffer_bytes: int = DEFAULT_STREAM_SEND_BUFFER_BYTES
    # Under heavy load, how long writes may wait to gather more frames per
    # socket (seconds; 0, the default: write every loop iteration). Trades
    # latency for CPU: fewer, larger writes. Light load never waits.
    max_flush_delay: float = DEFAULT_MAX_FLUSH_DELAY_S

    # Replay (Last-Event-ID): what is kept in memory; any of them 0 turns it off
    history_size: int = DEFAULT_HISTORY_SIZE
    history_bytes: int = DEFAULT_HISTORY_BYTES
    history_age: float = DEFAULT_HISTORY_AGE_S

    # HTTP limits
    max_url_bytes: int = DEFAULT_MAX_URL_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_headers: int = DEFAULT_MAX_HEADERS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Messages one POST /publish may carry (NDJSON or a JSON array); the body
    # stays bounded by max_body_bytes too.
    max_batch_messages: int = DEFAULT_MAX_BATCH_MESSAGES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    # A plain POST <publish_path>?topic=T is read and answered straight from
    # the input buffer by the compiled core (a strict subset of HTTP/1.1;
    # anything else goes to httptools). Off only to rule it out.
    fast_publish: bool = True
    # The same for a plain GET <events_path>?topic=T...: a connect with no id,
    # Origin, Last-Event-ID or authorization goes to the events route
    # without httptools or a request object. Off only to rule it out.
    fast_connect: bool = True
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S
    # Processes serving the port, each a full node on the broker (see
    # docs/workers.md); above 1 it needs a broker driver, not mem.
    workers: int = DEFAULT_WORKERS
    # The window (seconds) each stream's "retry:" at shutdown is drawn from.
    shutdown_retry_min: float = DEFAULT_SHUTDOWN_RETRY_MIN_S
    shutdown_retry_max: float = DEFAULT_SHUTDOWN_RETRY_MAX_S
    # New connections per second per peer address (0: off), and the burst
    # allowed above that rate. Behind a reverse proxy every connection comes
    # from the proxy: raise them, or turn the rate off.
    connection_rate_per_peer: float = DEFAULT_CONNECTION_RATE_PER_PEER
    connection_burst_per_peer: int = DEFAULT_CONNECTION_BURST_PER_PEER
    # One JSON line per request on the gochan.access logger (stderr).
    access_log: bool = False

    # Cluster (docs/cluster.md): client state on the broker's store, so any
    # node serves any client.
    cluster: bool = False
    cluster_store: str = ""  # nats:// or redis:// URL; "": the driver's own broker
    cluster_name: str = DEFAULT_CLUSTER_NAME  # keys and channels of one cluster
    node_id: str = ""  # "": host name, process id and random characters
    cluster_timeout: float = DEFAULT_CLUSTER_TIMEOUT_S

    # Security
    publish_key: str = ""
    cors_origins: list[str] = field(default_factory=list)
    # Host names a keyless loopback server answers state-changing requests
    # for, besides loopback names (DNS rebinding protection).
    allowed_hosts: list[str] = field(default_factory=list)
    # Authorization: on when jwt_key or jwt_jwks_file is set (see docs/authorization.md).
    # jwt_key: the HMAC secret, or the path of a PEM public key (RS*/ES*).
    jwt_key: str = ""
    jwt_algorithms: list[str] = field(default_factory=lambda: list(DEFAULT_JWT_ALGORITHMS))
    jwt_audience: str = ""  # "": the aud claim is not checked
    jwt_issuer: str = ""  # "": the iss claim is not checked
    jwt_jwks_file: str = ""  # a JWKS document on disk, keys picked by kid
    jwt_cookie: str = DEFAULT_JWT_COOKIE
    jwt_query_param: bool = False  # also read ?access_token= (tokens in URLs reach logs)

    # Paths
    events_path: str = "/events"
    update_path: str = "/update_subscriptions"
    publish_path: str = "/publish"
    healthz_path: str = "/healthz"
    readyz_path: str = "/readyz"
    metrics_path: str = "/metrics"
    client_js_path: str = "/gochan.js"  # the browser client, served by gochan
    static_dir: str = ""  # files served at / for GET (index.html for /); off when empty

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check (and normalise) every field; raise :class:`ConfigurationError`
        naming the first bad one."""
        for f in _FIELDS.values():
            setattr(self, f.name, _convert(f.name, getattr(self, f.name)))
        seen: dict[str, str] = {}
        for name in _FIELDS:
            if name.endswith("_path"):
                path = getattr(self, name)
                if path in seen:
                    raise ConfigurationError(f"{name}: {path!r} is already {seen[path]}")
                seen[path] = name
        if self.workers > 1 and self.driver == "mem":
            raise ConfigurationError(
                f"workers: {self.workers} processes cannot share the mem driver's state "
                "(it lives in one process); use a broker driver such as nats or redis"
            )
        if self.cluster:
            self._check_cluster()
        if self.shutdown_retry_max < self.shutdown_retry_min:
            raise ConfigurationError(
                f"shutdown_retry_max: expected a number >= shutdown_retry_min "
                f"({self.shutdown_retry_min:g}), got {self.shutdown_retry_max:g}"
            )
        if not isinstance(self.driver_options, Mapping):
            raise ConfigurationError(
                f"driver_options: expected a mapping, got {self.driver_options!r}"
            )
        self._check_jwt()
        params = driver_parameters(self.driver)  # MissingExtraError without its library
        self.driver_options = {
            name: _convert_option(self.driver, name, value, params)
            for name, value in self.driver_options.items()
        }

    def _check_cluster(self) -> None:
        if self.workers > 1:
            raise ConfigurationError(
                "cluster: run one node per process (workers: 1); each node serves any client"
            )
        if self.driver == "mem":
            raise ConfigurationError(
                "cluster: the mem driver's messages stay in one process; use a broker driver"
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.cluster_name):
            raise ConfigurationError(
                f"cluster_name: 1..32 characters of A-Z a-z 0-9 _ -, got {self.cluster_name!r}"
            )
        if self.node_id and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.node_id):
            raise ConfigurationError(
                f"node_id: 1..64 characters of A-Z a-z 0-9 _ -, got {self.node_id!r}"
            )
        if self.driver not in ("nats", "redis") and not self.cluster_store:
            raise ConfigurationError(
                f"cluster: the {self.driver} driver has no store of its own; "
                "set cluster_store to a nats:// or redis:// URL"
            )

    def _check_jwt(self) -> None:
        algorithms = self.jwt_algorithms
        if not algorithms:
            raise ConfigurationError("jwt_algorithms: name at least one algorithm")
        unknown = [a for a in algorithms if a not in JWT_ALGORITHMS]
        if unknown:
            raise ConfigurationError(
                f"jwt_algorithms: unknown algorithm {unknown[0]!r} "
                f"(one of {', '.join(sorted(JWT_ALGORITHMS))})"
            )
        hmac = set(algorithms) & HMAC_ALGORITHMS
        if hmac and len(hmac) != len(set(algorithms)):
            # One key for both would let a public key be used as an HMAC secret.
            raise ConfigurationError(
                "jwt_algorithms: HMAC (HS*) and public-key algorithms cannot be mixed"
            )
        if not self.jwt_cookie or any(c in self.jwt_cookie for c in ";=, \t"):
            raise ConfigurationError(f"jwt_cookie: not a cookie name: {self.jwt_cookie!r}")

    @property
    def auth_enabled(self) -> bool:
        """Authorization is on: a JWT key or JWKS file is set."""
        return bool(self.jwt_key or self.jwt_jwks_file)

    @property
    def peer_connection_limit(self) -> int:
        """max_connections_per_peer, or its default share."""
        return self.max_connections_per_peer or max(1, self.max_connections // PEER_SHARE_DIVISOR)

    @property
    def peer_client_limit(self) -> int:
        """max_clients_per_peer, or its default share."""
        return self.max_clients_per_peer or max(1, self.max_clients // PEER_SHARE_DIVISOR)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    # -- loading -----------------------------------------------------------

    @classmethod
    def from_sources(
        cls,
        *,
        yaml_file: str | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
        driver_flags: Mapping[str, str | None] | None = None,
    ) -> Config:
        """Merge defaults < YAML < environment < flags into one Config
        (see :func:`load`)."""
        return load(yaml_file=yaml_file, env=env, flags=flags, driver_flags=driver_flags)[0]


# One help line per Config field, stating its default and unit: the text of
# `python -m gochan.server --help` and of docs/configuration.md (regenerated
# by `python -m gochan.server.reference`). tests/test_docs.py fails on a field
# without one, or one whose stated default is not the field's.
FLAG_HELP: dict[str, str] = {
    # Listening
    "host": "address to listen on (default 127.0.0.1: loopback only; 0.0.0.0 or :: for all)",
    "port": "TCP port to listen on (default 3000; 0: any free port)",
    "driver": "message source: a driver of docs/drivers.md, listed at the end of --help "
    "(default mem: in-process only)",
    "log_level": "debug, info, warning or error (default info)",
    # Clients and streams
    "client_ttl": "seconds a client outlives its last connection, or its creation (default 60 s)",
    "heartbeat": "seconds between heartbeat comments on an idle stream (default 15 s)",
    "retry_ms": "retry: field, in milliseconds, sent before a stream's first frame "
    "(default 0: none, browsers use their own)",
    "auto_create_clients": "GET /events without an id creates a client (default true)",
    "max_connections": "open TCP connections, streams included; more get 503 "
    "(default: the open-file limit less 256, at most 50000)",
    "max_clients": "clients held; more get 503 (default 100000)",
    "max_connections_per_peer": "connections one peer address may hold; more get 503 "
    "(default 0: a tenth of max_connections)",
    "max_clients_per_peer": "clients one peer address may create without an id; more get "
    "429 (default 0: a tenth of max_clients)",
    "max_topics_per_client": "topics one client may hold; more is a 400 (default 1024)",
    "max_pending_bytes": "bytes of unsent output a stream may queue before it is cut as a "
    "slow consumer (default 1048576 = 1 MiB)",
    "write_buffer_high_bytes": "bytes of unsent answers past which a connection's further "
    "requests wait (default 65536 = 64 KiB)",
    "stream_send_buffer_bytes": "kernel send buffer of a stream socket, in bytes "
    "(default 262144 = 256 KiB; 0: the kernel's autotuning)",
    "max_flush_delay": "seconds writes may wait under heavy load to carry more frames per "
    "socket: less CPU, more latency (default 0: off)",
    # Replay
    "history_size": "messages kept in memory for Last-Event-ID replay (default 10000; "
    "0: replay off)",
    "history_bytes": "bytes of messages kept for replay (default 16777216 = 16 MiB; 0: replay off)",
    "history_age": "seconds a message is kept for replay (default 300 s; 0: replay off)",
    # HTTP limits
    "max_url_bytes": "longest request line, in bytes; longer is a 431 (default 8192 = 8 KiB)",
    "max_header_bytes": "largest request head, in bytes; larger is a 431 (default 16384 = 16 KiB)",
    "max_headers": "most header fields in a request; more is a 431 (default 100)",
    "max_body_bytes": "largest request body, in bytes; larger is a 413 (default 1048576 = 1 MiB)",
    "max_batch_messages": "most messages one batch publish (NDJSON or a JSON array) may carry; "
    "more is a 413 and nothing is published (default 1000)",
    "header_timeout": "seconds a request has to arrive whole; slower gets 408 (default 10 s)",
    "keepalive_timeout": "seconds an idle keep-alive connection is kept open (default 75 s)",
    "fast_publish": "read plain POST ?topic= publishes on the compiled fast path, off with "
    "authorization or the access log (default true)",
    "fast_connect": "read plain GET /events?topic= connects (no id, Origin or Last-Event-ID) on "
    "the compiled fast path, off with authorization or the access log (default true)",
    "shutdown_grace": "seconds requests and streams get to finish on SIGTERM/SIGINT (default 5 s)",
    "shutdown_retry_min": "at shutdown, the shortest retry: a stream is given, in seconds "
    "(default 1 s)",
    "shutdown_retry_max": "at shutdown, the longest retry: a stream is given, in seconds; "
    "at least shutdown_retry_min (default 30 s)",
    "connection_rate_per_peer": "new connections per second one peer address may open; past "
    "it 429 with Retry-After; 0: no limit (default 100)",
    "connection_burst_per_peer": "new connections one peer address may open at once above "
    "that rate, the token bucket's size (default 200)",
    "access_log": "one JSON line per request on stderr, logger gochan.access (default false)",
    "cluster": "keep client state on the cluster store so any node serves any client; "
    "needs the nats or redis driver, or cluster_store (default false)",
    "cluster_store": "the cluster store, a nats:// (JetStream on) or redis:// URL "
    "(default none: the driver's own server)",
    "cluster_name": "names the keys and channels of one cluster on its store, "
    "1..32 of A-Z a-z 0-9 _ - (default gochan)",
    "node_id": "this node's name in the cluster, 1..64 of A-Z a-z 0-9 _ - "
    "(default none: host name, process id and 4 random hex digits)",
    "cluster_timeout": "seconds an update waits for the nodes holding the client's streams "
    "before it is answered 504 (default 5 s)",
    "workers": "processes serving one port (SO_REUSEPORT), each a full node on the broker, "
    "restarted when one dies; refused for driver mem (default 1)",
    # Security
    "publish_key": "bearer token POST /publish requires (default none: only loopback "
    "peers of a loopback-only server may publish)",
    "jwt_key": "HMAC secret, or the path of a PEM public key; set, it turns authorization "
    "on (default none: off)",
    "jwt_algorithms": "JWT algorithms accepted, comma-separated; RS256/ES256 need a PEM key "
    "(default HS256)",
    "jwt_audience": "aud claim every token must carry (default none: not checked)",
    "jwt_issuer": "iss claim every token must carry (default none: not checked)",
    "jwt_jwks_file": "JWKS file of public keys picked by kid; set, it turns authorization on "
    "(default none)",
    "jwt_cookie": "cookie the token is read from after Authorization: Bearer "
    "(default gochan_token)",
    "jwt_query_param": "also read the token from ?access_token= (default false: URLs end up "
    "in logs)",
    "max_streams_per_client": "open streams one client id may have; more is a 429 (default 16)",
    "max_streams_per_identity": "open streams one token identity may have, authorization on; "
    "more is a 429 (default 128)",
    "publish_rate_per_identity": "publishes per second one token identity may make; past it "
    "429 with Retry-After (default 100)",
    "publish_burst": "publishes one token identity may make at once above that rate (default 200)",
    "cors_origins": "origins allowed by CORS and to send state-changing requests, "
    "comma-separated, or * (default none)",
    "allowed_hosts": "Host names a keyless loopback server accepts on state-changing "
    "requests besides loopback names, comma-separated (default none)",
    # Paths
    "events_path": "path of the event stream (default /events)",
    "update_path": "path of subscription updates (default /update_subscriptions)",
    "publish_path": "path of publishing (default /publish)",
    "healthz_path": "path of the liveness check (default /healthz)",
    "readyz_path": "path of the readiness check (default /readyz)",
    "metrics_path": "path of the Prometheus metrics (default /metrics)",
    "client_js_path": "path the browser client gochan.js is served at (default /gochan.js)",
    "static_dir": "directory of files served at / for GET, index.html for / (default none: off)",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "driver_options"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _expected(name: str, kind: str, bounds: tuple[float, float | None, bool] | None) -> str:
    """What ``name`` must be, as the error says it."""
    if name == "log_level":
        return "one of " + ", ".join(LOG_LEVELS)
    if name == "driver":
        from .drivers import DRIVERS

        return "one of " + ", ".join(sorted(DRIVERS))
    if name.endswith("_path"):
        return "a path starting with '/'"
    if kind in ("int", "float"):
        text = "an integer" if kind == "int" else "a number"
        if bounds is None:
            return text
        low, high, above = bounds
        if high is not None:
            return f"{text} {low:g}..{high:g}"
        return f"{text} {'>' if above else '>='} {low:g}"
    return {
        "bool": "true or false (yes/no, on/off, 1/0)",
        "list[str]": "a list of strings or a comma-separated string",
        "str": "a string",
    }.get(kind, kind)


def _parse(kind: str, value: Any) -> Any:
    """``value`` (a YAML or Python value, or a string from the environment
    or a flag) as ``kind``; ValueError if it is not one."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if type(value) is int and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            return int(value.strip())
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
        else:
            raise ValueError(value)
        if math.isfinite(number):
            return number
    elif kind == "list[str]":
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return [v.strip() for v in items if v.strip()]
    elif kind == "str":
        if isinstance(value, str):
            return value
    else:
        return value  # a driver option of a type gochan does not check
    raise ValueError(value)


def _in_range(value: float, bounds: tuple[float, float | None, bool] | None) -> bool:
    if bounds is None:
        return True
    low, high, above = bounds
    return (value > low if above else value >= low) and (high is None or value <= high)


def _convert(name: str, value: Any) -> Any:
    """``value`` for the field ``name``, checked, or a one-line ConfigurationError."""
    kind = str(_FIELDS[name].type)
    bounds = _RANGES.get(name, (0, None, False)) if kind in ("int", "float") else None
    try:
        result = _parse(kind, value)
        if name == "log_level":
            result = result.strip().lower()
            ok = result in LOG_LEVELS
        elif name == "driver":
            from .drivers import DRIVERS

            ok = result in DRIVERS
        elif name.endswith("_path"):
            ok = result.startswith("/")
        else:
            ok = bounds is None or _in_range(result, bounds)
    except (TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise ConfigurationError(
            f"{name}: expected {_expected(name, kind, bounds)}, got {_got(name, value)}"
        )
    return result


def _got(name: str, value: Any) -> str:
    """``value`` as an error shows it: a secret's type, never the value."""
    option = name.rpartition(".")[2] if "." in name else ""
    if name in ("publish_key", "jwt_key") or any(s in option for s in _SECRET_OPTIONS):
        return f"a value of type {type(value).__name__}"
    return repr(value)


def _option_kind(param: inspect.Parameter) -> str:
    annotation = param.annotation
    if isinstance(annotation, type):
        annotation = annotation.__name__
    if annotation in ("str", "int", "float", "bool"):
        return str(annotation)
    if param.default is not inspect.Parameter.empty and param.default is not None:
        return type(param.default).__name__
    return "any"


def _convert_option(
    driver: str, name: str, value: Any, params: Mapping[str, inspect.Parameter]
) -> Any:
    """A driver option, typed from the constructor's annotation or default."""
    param = params.get(name)
    if param is None:
        known = ", ".join(sorted(params)) or "none"
        raise ConfigurationError(f"driver {driver!r} has no option {name!r} (options: {known})")
    kind = _option_kind(param)
    positive = kind in ("int", "float") and name.endswith(_POSITIVE_OPTIONS)
    bounds = _ABOVE_ZERO if positive else None
    try:
        result = _parse(kind, value)
        ok = kind not in ("int", "float") or _in_range(result, bounds)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        expected = _expected(name, kind, bounds)
        got = _got(f"{driver}.{name}", value)
        raise ConfigurationError(f"{driver}.{name}: expected {expected}, got {got}")
    return result


def driver_parameters(driver: str) -> dict[str, inspect.Parameter]:
    """The keyword options the driver's constructor takes."""
    from .drivers import DRIVERS, driver_class

    if driver not in DRIVERS:
        _convert("driver", driver)  # raises the error listing the known drivers
    params = inspect.signature(driver_class(driver)).parameters
    return {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


# -- loading ---------------------------------------------------------------


def load(
    *,
    yaml_file: str | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    driver_flags: Mapping[str, str | None] | None = None,
) -> tuple[Config, dict[str, str]]:
    """Merge defaults < YAML < environment < flags into one Config, and say
    where each value came from (``{"port": "env GOCHAN_PORT", ...}``).

    ``flags`` maps field names to values (None: not given); ``driver_flags``
    maps the other flags, as given without their ``--`` (``"nats-url"``), to
    their value (None for a bare ``--nats-jetstream``). Every value given is
    checked, even one a later source overrides.
    """
    from .drivers import DRIVERS

    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    blocks: dict[str, Any] = {}  # <driver>: and driver_options: mappings
    for key, value in (_read_yaml(yaml_file) if yaml_file else {}).items():
        name = str(key).replace("-", "_")
        if name in DRIVERS or name == "driver_options":
            blocks[name] = value
        elif name not in _FIELDS:
            close = difflib.get_close_matches(name, _FIELDS, 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(f"unknown configuration key {name!r}{hint}")
        elif value is not None:
            values[name], sources[name] = _convert(name, value), "yaml"
    for name in _FIELDS:
        raw = env.get("GOCHAN_" + name.upper())
        if raw is not None:
            values[name], sources[name] = _convert(name, raw), "env GOCHAN_" + name.upper()
    for name, value in (flags or {}).items():
        if name not in _FIELDS:
            raise ConfigurationError(f"unknown configuration key {name!r}")
        if value is not None:
            flag = "--" + name.replace("_", "-")
            values[name], sources[name] = _convert(name, value), "flag " + flag
    driver = values.get("driver", "mem")
    params = driver_parameters(driver)
    options: dict[str, Any] = {}

    def put(name: str, value: Any, source: str) -> None:
        options[name] = _convert_option(driver, name, value, params)
        sources[f"{driver}.{name}"] = source

    for block_name in (driver, "driver_options"):
        block = blocks.get(block_name) or {}
        if not isinstance(block, Mapping):
            raise ConfigurationError(f"{block_name}: expected a mapping of options, got {block!r}")
        for key, value in block.items():
            put(str(key).replace("-", "_"), value, "yaml")
    for name, block in blocks.items():
        if name not in (driver, "driver_options") and not isinstance(block, (Mapping, type(None))):
            raise ConfigurationError(f"{name}: expected a mapping of options, got {block!r}")
    prefix = f"GOCHAN_{driver.upper()}_"
    for key, raw in env.items():
        if key.startswith(prefix):
            put(key[len(prefix) :].lower(), raw, "env " + key)
    for flag, raw in (driver_flags or {}).items():
        name, value = _driver_flag(driver, flag, raw, params)
        put(name, value, "flag --" + flag)
    return Config(**values, driver_options=options), sources


def _driver_flag(
    driver: str, flag: str, value: str | None, params: Mapping[str, inspect.Parameter]
) -> tuple[str, Any]:
    """The option a ``--<driver>-<option>`` (or ``--no-<driver>-<option>``)
    flag sets, and its value."""
    from .drivers import DRIVERS

    negated = flag.startswith("no-")
    body = flag[3:] if negated else flag
    if not body.startswith(driver + "-"):
        other = body.split("-", 1)[0]
        if other in DRIVERS and "-" in body:
            raise ConfigurationError(
                f"--{flag} is an option of driver {other!r}; the driver is {driver!r}"
            )
        raise ConfigurationError(f"unknown option '--{flag}'")
    name = body[len(driver) + 1 :].replace("-", "_")
    param = params.get(name)
    is_bool = param is not None and _option_kind(param) == "bool"
    if value is None and is_bool:
        return name, not negated
    if negated:
        raise ConfigurationError(f"unknown option '--{flag}'")
    if value is None:
        raise ConfigurationError(f"--{flag} needs a value")
    return name, value


def _read_yaml(path: str) -> dict[Any, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())  # YAML errors span lines
        raise ConfigurationError(f"cannot read config file {path}: {reason}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: the top level must be a mapping")
    return data


# -- showing ---------------------------------------------------------------


def _show(name: str, value: Any) -> str:
    """One value as --check-config prints it: secrets never in clear."""
    if isinstance(value, str) and value and _got(name, value) != repr(value):
        return "<redacted>"
    if isinstance(value, list):
        return ",".join(value) or "''"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return _redact_url(value) or "''"
    return str(value)


def _redact_url(value: str) -> str:
    """``value`` with the password of a URL in it replaced by ``***``."""
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return value
    except ValueError:
        return value
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def describe(config: Config, sources: Mapping[str, str] | None = None) -> list[str]:
    """The effective configuration, one ``key = value  (source)`` line per
    key, driver options (``nats.url``) included; secrets redacted."""
    sources = sources or {}
    items = [(name, getattr(config, name)) for name in _FIELDS]
    for name, param in driver_parameters(config.driver).items():
        default = None if param.default is inspect.Parameter.empty else param.default
        items.append((f"{config.driver}.{name}", config.driver_options.get(name, default)))
    width = max(len(name) for name, _ in items)
    return [
        f"{name:<{width}} = {_show(name, value)}  ({sources.get(name, 'default')})"
        for name, value in items
    ]
