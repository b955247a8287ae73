"""The reference of every setting and driver option, from the code.

One source for ``python -m gochan.server --help`` and for the generated
tables of docs/configuration.md and docs/drivers.md: the help lines are
:data:`gochan.config.FLAG_HELP`, the defaults and types the fields of
:class:`~gochan.config.Config`, the driver options each driver's constructor
signature and the "Keyword arguments" part of its docstrings.

``python -m gochan.server.reference [DOCS_DIR]`` rewrites the generated
blocks of the docs (tests/test_docs.py fails when they are stale).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import FLAG_HELP, Config, _option_kind, driver_parameters
from ..drivers import DRIVERS
from ..errors import MissingExtraError

__all__ = [
    "SECTIONS",
    "DriverOption",
    "config_table",
    "driver_options",
    "drivers_epilog",
    "field_sections",
    "help_parts",
    "unit",
]

# The groups of `--help` and of docs/configuration.md, in order. A field
# named in none of them is shown under "Other settings".
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Listening and processes", ("host", "port", "workers", "driver", "log_level", "access_log")),
    (
        "Clients and streams",
        (
            "client_ttl",
            "heartbeat",
            "retry_ms",
            "auto_create_clients",
            "max_flush_delay",
            "stream_send_buffer_bytes",
        ),
    ),
    ("Replay (Last-Event-ID)", ("history_size", "history_bytes", "history_age")),
    (
        "Authorization",
        (
            "jwt_key",
            "jwt_algorithms",
            "jwt_audience",
            "jwt_issuer",
            "jwt_jwks_file",
            "jwt_cookie",
            "jwt_query_param",
            "publish_key",
            "cors_origins",
            "allowed_hosts",
        ),
    ),
    (
        "Limits",
        (
            "max_connections",
            "max_connections_per_peer",
            "connection_rate_per_peer",
            "connection_burst_per_peer",
            "max_clients",
            "max_clients_per_peer",
            "max_topics_per_client",
            "max_streams_per_client",
            "max_streams_per_identity",
            "publish_rate_per_identity",
            "publish_burst",
            "max_pending_bytes",
            "write_buffer_high_bytes",
        ),
    ),
    (
        "HTTP limits",
        (
            "max_url_bytes",
            "max_header_bytes",
            "max_headers",
            "max_body_bytes",
            "max_batch_messages",
            "header_timeout",
            "keepalive_timeout",
            "fast_publish",
            "fast_connect",
        ),
    ),
    ("Shutdown", ("shutdown_grace", "shutdown_retry_min", "shutdown_retry_max")),
    ("Cluster", ("cluster", "cluster_store", "cluster_name", "node_id", "cluster_timeout")),
    (
        "Paths",
        (
            "events_path",
            "update_path",
            "publish_path",
            "healthz_path",
            "readyz_path",
            "metrics_path",
            "client_js_path",
            "static_dir",
        ),
    ),
)

# The unit of each setting, where the name does not say it (see unit()).
UNITS: dict[str, str] = {
    "host": "address",
    "port": "TCP port",
    "workers": "processes",
    "cluster_store": "URL",
    "cluster_name": "name",
    "node_id": "name",
    "cluster_timeout": "seconds",
    "driver": "driver name",
    "log_level": "level",
    "client_ttl": "seconds",
    "heartbeat": "seconds",
    "max_flush_delay": "seconds",
    "history_size": "messages",
    "history_age": "seconds",
    "jwt_key": "secret, or PEM file path",
    "jwt_algorithms": "list of algorithms",
    "jwt_audience": "string",
    "jwt_issuer": "string",
    "jwt_jwks_file": "file path",
    "jwt_cookie": "cookie name",
    "publish_key": "secret",
    "cors_origins": "list of origins",
    "allowed_hosts": "list of host names",
    "max_connections": "connections",
    "max_connections_per_peer": "connections",
    "connection_rate_per_peer": "connections/s",
    "connection_burst_per_peer": "connections",
    "max_clients": "clients",
    "max_clients_per_peer": "clients",
    "max_topics_per_client": "topics",
    "max_streams_per_client": "streams",
    "max_streams_per_identity": "streams",
    "publish_rate_per_identity": "publishes/s",
    "publish_burst": "publishes",
    "max_headers": "header fields",
    "max_batch_messages": "messages",
    "header_timeout": "seconds",
    "keepalive_timeout": "seconds",
    "shutdown_grace": "seconds",
    "shutdown_retry_min": "seconds",
    "shutdown_retry_max": "seconds",
    "static_dir": "directory",
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "driver_options"}
_HELP_RE = re.compile(r"(?s)(?P<meaning>.*?)\s*\(default:? (?P<default>.*)\)")


def unit(name: str) -> str:
    """The unit of the setting ``name`` ('' when the name and type give none)."""
    if name in UNITS:
        return UNITS[name]
    if name.endswith("_bytes"):
        return "bytes"
    if name.endswith("_ms"):
        return "milliseconds"
    if name.endswith("_path"):
        return "URL path"
    kind = str(_FIELDS[name].type) if name in _FIELDS else ""
    return {"bool": "boolean", "list[str]": "list"}.get(kind, "")


def help_parts(name: str) -> tuple[str, str]:
    """The help line of ``name`` split into its meaning and the default it
    states (``("port to listen on", "3000")``); ValueError without one."""
    text = FLAG_HELP.get(name)
    if text is None:
        raise ValueError(f"{name}: no help line in gochan.config.FLAG_HELP")
    match = _HELP_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{name}: the help line must end with '(default ...)': {text!r}")
    return match["meaning"], match["default"]


def field_sections() -> list[tuple[str, list[str]]]:
    """The sections with the Config fields they hold, in order; fields named
    in no section last, under "Other settings"."""
    placed = {name for _, names in SECTIONS for name in names}
    sections = [(title, [n for n in names if n in _FIELDS]) for title, names in SECTIONS]
    others = [name for name in _FIELDS if name not in placed]
    if others:
        sections.append(("Other settings", others))
    return [(title, names) for title, names in sections if names]


def flag_of(name: str) -> str:
    """The flag of setting ``name`` (``--x, --no-x`` for a boolean)."""
    flag = "--" + name.replace("_", "-")
    if name in _FIELDS and str(_FIELDS[name].type) == "bool":
        return f"{flag}, --no-{flag[2:]}"
    return flag


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_table() -> str:
    """docs/configuration.md's reference: one table per section."""
    out: list[str] = []
    for title, names in field_sections():
        out += [f"### {title}", "", "| Key | Flag | Variable | Default | Unit | Meaning |"]
        out.append("| --- | --- | --- | --- | --- | --- |")
        for name in names:
            meaning, default = help_parts(name)
            flags = ", ".join(f"`{f}`" for f in flag_of(name).split(", "))
            out.append(
                f"| `{name}` | {flags} | `GOCHAN_{name.upper()}` | {_cell(default)} "
                f"| {unit(name)} | {_cell(meaning)} |"
            )
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# -- drivers ---------------------------------------------------------------


@dataclass(frozen=True)
class DriverOption:
    name: str
    kind: str  # str, int, float, bool or any (see config._option_kind)
    default: Any  # inspect.Parameter.empty when required
    doc: str  # from the driver's docstrings; '' when undocumented

    @property
    def unit(self) -> str:
        """The option's unit, from the drivers' shared vocabulary of names."""
        if self.kind not in ("int", "float"):
            return ""
        if self.name in _OPTION_UNITS:
            return _OPTION_UNITS[self.name]
        return "s" if self.name.endswith(_SECONDS_OPTIONS) else ""

    @property
    def default_text(self) -> str:
        if self.default is inspect.Parameter.empty:
            return "required"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if self.default == "":
            return "''"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


# Driver options whose names end so are durations in seconds.
_SECONDS_OPTIONS = (
    "timeout",
    "_interval",
    "reconnect_min",
    "reconnect_max",
    "_age",
    "_block",
    "heartbeat",
    "keepalive",
    "wait_time",
)
_OPTION_UNITS = {
    "port": "TCP port",
    "qos": "QoS level",
    "pool_size": "connections",
    "stream_maxlen": "entries",
    "stream_batch": "entries",
    "stream_max_msgs_per_subject": "messages",
}

# "name", "``name``" or "``a``, ``b``", optionally followed by "(type, unit)"
_TERM_RE = re.compile(r"(``)?\w+(``)?(, (``)?\w+(``)?)*( \(.*\))?")


def _option_docs(doc: str) -> dict[str, str]:
    """The description of each option in a numpy-style "Keyword arguments"
    list (a term line, then indented description lines)."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    for i, line in enumerate(lines[:-1]):
        if not _TERM_RE.fullmatch(line) or not lines[i + 1].startswith("    "):
            continue
        body: list[str] = []
        for more in lines[i + 1 :]:
            if not more.startswith("    "):
                break
            body.append(more.strip())
        names = re.findall(r"\w+", line.split(" (")[0])
        text = re.sub(
            r":\w+:`~?([\w.]+)`", lambda m: f"`{m[1].rsplit('.', 1)[-1]}`", " ".join(body)
        )
        text = re.sub(r"``(.+?)``", r"`\1`", text)
        for name in names:
            docs.setdefault(name, text)
    return docs


def _doc_sources(name: str) -> Iterator[str]:
    """The docstrings that may describe a driver's options: its class (and
    bases) or factory, then the other gochan driver classes its module uses."""
    module_name, attr, _ = DRIVERS[name]
    module = importlib.import_module(module_name)
    entry = getattr(module, attr)
    seen: list[Any] = [entry, *getattr(entry, "__mro__", ())]
    for value in vars(module).values():
        if inspect.isclass(value) and value.__module__.startswith("gochan.drivers"):
            seen += [value, *value.__mro__]
    for obj in dict.fromkeys(seen):
        if obj.__doc__:
            yield obj.__doc__


def driver_options(name: str) -> list[DriverOption]:
    """The options of driver ``name``, from its constructor's signature
    (MissingExtraError without its extra)."""
    params = driver_parameters(name)
    docs: dict[str, str] = {}
    for doc in _doc_sources(name):
        for option, text in _option_docs(doc).items():
            docs.setdefault(option, text)
    return [
        DriverOption(option, _option_kind(p), p.default, docs.get(option, ""))
        for option, p in params.items()
    ]


def driver_table(name: str) -> str:
    """The options of one driver as a markdown table, for docs/drivers.md."""
    options = driver_options(name)
    if not options:
        return "No options.\n"
    rows = ["| Option | Flag | Variable | Type | Default | Meaning |"]
    rows.append("| --- | --- | --- | --- | --- | --- |")
    for opt in options:
        flag = f"--{name}-{opt.name.replace('_', '-')}"
        flags = f"`{flag}`, `--no-{flag[2:]}`" if opt.kind == "bool" else f"`{flag}`"
        unit = f" {opt.unit}" if opt.unit else ""
        rows.append(
            f"| `{opt.name}` | {flags} | `GOCHAN_{name.upper()}_{opt.name.upper()}` "
            f"| {opt.kind} | `{opt.default_text}`{unit} | {_cell(opt.doc)} |"
        )
    return "\n".join(rows) + "\n"


# What a gochan topic becomes on each broker, for the README's table.
TOPICS_BECOME = {
    "mem": "nothing outside the process",
    "nats": "subject `prefix + topic` (JetStream: one stream)",
    "redis": "channel `prefix + topic` (Streams: one key for all)",
    "kafka": "Kafka topic `prefix + topic` (or keys of one `log_topic`)",
    "sqs": "SNS topic `prefix + topic`, one SQS queue per process",
    "pubsub": "Pub/Sub topic `prefix + topic`, one subscription per process",
    "rabbitmq": "binding key on one topic exchange, one queue per process",
    "mqtt": "MQTT topic `prefix + topic`",
    "postgres": "LISTEN/NOTIFY channel `prefix + topic`",
}


def readme_drivers_table() -> str:
    """The README's drivers: name, extra, what a topic becomes, every option
    with its default (docs/drivers.md has what each means)."""
    rows = ["| Driver | Install | A topic becomes | Options (default) |"]
    rows.append("| --- | --- | --- | --- |")
    for name, (_, _, extra) in DRIVERS.items():
        install = f"`pip install 'gochan[{extra}]'`" if extra else "built in"
        options = ", ".join(f"`{o.name}={o.default_text}`" for o in driver_options(name))
        link = f"[`{name}`](docs/drivers.md#{name})"
        rows.append(f"| {link} | {install} | {TOPICS_BECOME[name]} | {options or 'none'} |")
    return "\n".join(rows) + "\n"


def drivers_epilog() -> str:
    """The end of ``--help``: every driver, its extra and its options."""
    out = [
        "drivers (--driver NAME) and their options:",
        "  A driver option OPTION is the flag --<driver>-<option> VALUE (booleans:",
        "  --<driver>-<option> / --no-<driver>-<option>), the variable",
        "  GOCHAN_<DRIVER>_<OPTION>, or a key of a <driver>: mapping in the YAML file;",
        "  underscores in OPTION are dashes in the flag (--nats-connect-timeout 2).",
    ]
    for name, (_, _, extra) in DRIVERS.items():
        install = f" (pip install 'gochan[{extra}]')" if extra else " (built in)"
        out += ["", f"  {name}{install}"]
        try:
            options = driver_options(name)
        except MissingExtraError:
            out.append(f"    its options are listed once gochan[{extra}] is installed")
            continue
        if not options:
            out.append("    no options")
        for opt in options:
            flag = f"--{name}-{opt.name.replace('_', '-')}"
            value = "" if opt.kind == "bool" else f" {opt.kind.upper()}"
            unit = f" {opt.unit}" if opt.unit else ""
            out.append(f"    {flag}{value} (default {opt.default_text}{unit})")
    return "\n".join(out)


# -- the generated blocks of the docs --------------------------------------

BEGIN = "<!-- generated by `python -m gochan.server.reference`: {name} -->"
END = "<!-- end of generated {name} -->"


def blocks() -> dict[tuple[str, str], str]:
    """What each generated block of the docs holds: (file, block) -> text."""
    result = {("configuration.md", "settings"): config_table()}
    for name in DRIVERS:
        result["drivers.md", f"{name} options"] = driver_table(name)
    result["../README.md", "drivers"] = readme_drivers_table()
    return result


def block_pattern(name: str) -> re.Pattern[str]:
    begin, end = (re.escape(s.format(name=name)) for s in (BEGIN, END))
    return re.compile(f"(?s)({begin}\n)(.*?)({end})")


def _fill(text: str, match: re.Match[str]) -> str:
    return f"{match[1]}\n{text}\n{match[3]}"


def regenerate(docs: Path) -> list[str]:
    """Rewrite every generated block under ``docs``; the files changed."""
    changed: list[str] = []
    for (file, name), text in blocks().items():
        path = docs / file
        old = path.read_text(encoding="utf-8")
        pattern = block_pattern(name)
        if not pattern.search(old):
            raise SystemExit(f"{path}: no generated block {name!r}")
        new = pattern.sub(functools.partial(_fill, text), old)
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(f"{file} ({name})")
    return changed


if __name__ == "__main__":
    where = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    for item in regenerate(where):
        print("updated", item)
