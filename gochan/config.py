"""One configuration object for the streamer and the server.

Values come, lowest precedence first, from the defaults below, a YAML file
(``--config``), ``GOCHAN_*`` environment variables and command-line flags.
Every knob has a named default with its unit.

Driver options are not fixed here: they are the keyword arguments of the
chosen driver's constructor, set as ``--<driver>-<option>`` flags,
``GOCHAN_<DRIVER>_<OPTION>`` variables, or a ``<driver>:`` mapping in YAML.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError

__all__ = ["Config"]

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
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 75.0
DEFAULT_MAX_PENDING_BYTES = 1024 * 1024
DEFAULT_WRITE_BUFFER_HIGH_BYTES = 64 * 1024
DEFAULT_STREAM_SEND_BUFFER_BYTES = 64 * 1024  # SO_SNDBUF of a stream socket
DEFAULT_MAX_FLUSH_DELAY_S = 0.0  # off: see max_flush_delay
DEFAULT_SHUTDOWN_GRACE_S = 5.0
DEFAULT_TICK_S = 0.5
DEFAULT_HISTORY_SIZE = 10_000  # messages kept for Last-Event-ID replay
DEFAULT_HISTORY_BYTES = 16 * 1024 * 1024
DEFAULT_HISTORY_AGE_S = 300.0

_POSITIVE = [
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
    "header_timeout",
    "keepalive_timeout",
]


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
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE_S

    # Security
    publish_key: str = ""
    cors_origins: list[str] = field(default_factory=list)
    # Host names a keyless loopback server answers state-changing requests
    # for, besides loopback names (DNS rebinding protection).
    allowed_hosts: list[str] = field(default_factory=list)

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
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive, not {getattr(self, name)!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be 0..65535, not {self.port}")
        for name in (
            "retry_ms",
            "shutdown_grace",
            "history_size",
            "history_bytes",
            "history_age",
            "max_flush_delay",
            "stream_send_buffer_bytes",
            "max_connections_per_peer",
            "max_clients_per_peer",
        ):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} cannot be negative")
        paths = [
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name.endswith("_path")
        ]
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(f"paths must start with '/': {path!r}")
        if len(set(paths)) != len(paths):
            raise ConfigurationError("two endpoints have the same path")

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
        driver_flags: Mapping[str, str] | None = None,
    ) -> Config:
        """Merge defaults < YAML < environment < flags into one Config."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if yaml_file:
            values, options = _read_yaml(yaml_file)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "driver_options"}
        for name, f in fields.items():
            raw = env.get("GOCHAN_" + name.upper())
            if raw is not None:
                values[name] = _coerce(name, f.type, raw)
        for name, value in (flags or {}).items():
            if value is not None:
                values[name] = _coerce(name, fields[name].type, value)
        for name in values:
            if name not in fields:
                raise ConfigurationError(f"unknown configuration key {name!r}")
        driver = values.get("driver", "mem")
        options.update(_driver_options(driver, env, driver_flags or {}, options))
        return cls(**values, driver_options=options)


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: the top level must be a mapping")
    driver = str(data.get("driver", "mem"))
    options = data.pop(driver, None) or {}
    options.update(data.pop("driver_options", None) or {})
    if not isinstance(options, dict):
        raise ConfigurationError(f"{path}: driver options must be a mapping")
    return {str(k).replace("-", "_"): v for k, v in data.items()}, options


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Turn a string (from env or flags) or a YAML value into the field's type."""
    kind = str(kind)
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, list):
                return [str(v) for v in value]
            return [v.strip() for v in str(value).split(",") if v.strip()]
        return str(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}: cannot read {value!r} as {kind}") from None


def driver_parameters(driver: str) -> dict[str, inspect.Parameter]:
    """The keyword options the driver's constructor takes."""
    from .drivers import DRIVERS, create_driver

    if driver not in DRIVERS:
        create_driver(driver)  # raises the ConfigurationError listing known drivers
    module_name, class_name, _extra = DRIVERS[driver]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        return {}  # create_driver will name the missing extra
    params = inspect.signature(cls).parameters
    return {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def _driver_options(
    driver: str, env: Mapping[str, str], flags: Mapping[str, str], yaml_opts: Mapping[str, Any]
) -> dict[str, Any]:
    params = driver_parameters(driver)
    prefix = f"GOCHAN_{driver.upper()}_"
    found: dict[str, Any] = dict(yaml_opts)
    for key, raw in env.items():
        if key.startswith(prefix):
            found[key[len(prefix) :].lower()] = raw
    found.update(flags)
    options: dict[str, Any] = {}
    for name, value in found.items():
        param = params.get(name)
        if param is None:
            known = ", ".join(sorted(params)) or "none"
            raise ConfigurationError(f"driver {driver!r} has no option {name!r} (options: {known})")
        default = param.default
        kind = type(default).__name__ if default is not inspect.Parameter.empty else "str"
        options[name] = _coerce(f"{driver}.{name}", kind, value)
    return options
