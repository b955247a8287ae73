"""``python -m gochan.server``: run gochan as a standalone server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import resource
import signal
import sys
from collections.abc import Sequence

import uvloop

from ..auth import Authorize, JWTAuthorizer
from ..config import (
    DEFAULT_MAX_CONNECTIONS,
    FD_RESERVE,
    Config,
    default_max_connections,
    describe,
    fd_limit,
    load,
)
from ..drivers import Driver, create_driver
from ..errors import ConfigurationError
from ..streamer import Streamer

FLAG_HELP = {
    "host": "address to listen on (default 127.0.0.1: loopback only)",
    "port": "port to listen on (default 3000)",
    "driver": "message driver: mem (default), or a broker driver",
    "client_ttl": "seconds a client outlives its last connection (default 60)",
    "heartbeat": "seconds between heartbeats on idle streams (default 15)",
    "log_level": "debug, info, warning or error (default info)",
    "publish_key": "bearer token POST /publish requires (needed off loopback)",
    "cors_origins": "comma-separated origins allowed by CORS, or *",
    "jwt_key": "HMAC secret, or path of a PEM public key: turns authorization on (default off)",
    "jwt_algorithms": "comma-separated JWT algorithms accepted (default HS256)",
    "jwt_audience": "aud claim a token must carry (default: not checked)",
    "jwt_issuer": "iss claim a token must carry (default: not checked)",
    "jwt_jwks_file": "JWKS file of public keys picked by kid: turns authorization on (default off)",
    "jwt_cookie": "cookie the token is read from (default gochan_token)",
    "jwt_query_param": "also read the token from ?access_token= (default off: URLs reach logs)",
    "max_streams_per_client": "open streams one client id may have (default 16)",
    "max_streams_per_identity": "open streams one token identity may have (default 128)",
    "publish_rate_per_identity": "publishes per second one token identity may make (default 100)",
    "publish_burst": "publishes one token identity may make at once (default 200)",
}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, str | None]]:
    """The flags of Config's fields, and the others (``{"nats-url": "x"}``,
    None for a bare flag): driver options, resolved by :func:`load` once the
    driver is known from every source."""
    parser = argparse.ArgumentParser(
        prog="python -m gochan.server",
        description="gochan: relay pub/sub messages to browsers over Server-Sent Events. "
        "Every option is also a YAML key (--config) and a GOCHAN_<NAME> variable; "
        "driver options are --<driver>-<option> (GOCHAN_<DRIVER>_<OPTION>, or a "
        "<driver>: mapping in YAML).",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print it with where each value came from, and exit",
    )
    for f in dataclasses.fields(Config):
        if f.name == "driver_options":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                help=FLAG_HELP.get(f.name),
            )
        else:
            parser.add_argument(
                flag, dest=f.name, metavar=f.name.upper(), help=FLAG_HELP.get(f.name)
            )
    args, rest = parser.parse_known_args(argv)
    driver_flags: dict[str, str | None] = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        i += 1
        if not item.startswith("--") or item == "--":
            parser.error(f"unexpected argument {item!r}")
        name, eq, value = item[2:].partition("=")
        if eq:
            driver_flags[name] = value
        elif i < len(rest) and not rest[i].startswith("--"):
            driver_flags[name] = rest[i]
            i += 1
        else:
            driver_flags[name] = None  # a bare boolean option
    return args, driver_flags


async def run(
    config: Config, driver: Driver | None = None, authorize: Authorize | None = None
) -> None:
    streamer = Streamer(config, driver=driver, authorize=authorize)
    await streamer.start()
    server = await streamer.serve()
    # What exists now (modules, config, driver) lives as long as the process:
    # keep it out of the full collections a connect storm triggers (after
    # collecting startup's garbage, which would otherwise be frozen too).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    for host, port in server.sockets:
        print(f"gochan listening on http://{host}:{port} (driver {config.driver})", flush=True)
    log = logging.getLogger("gochan.server")
    if not server.router.trust_loopback and not config.publish_key:
        log.warning("listening beyond loopback without publish_key: POST /publish is refused")
    fds = fd_limit()
    log.info(
        "max_connections %d (%s), %d per peer address; max_clients %d, %d per peer address",
        config.max_connections,
        f"open-file limit {fds} less {FD_RESERVE} kept back"
        if config.max_connections == default_max_connections() and fds < DEFAULT_MAX_CONNECTIONS
        else "as configured",
        config.peer_connection_limit,
        config.max_clients,
        config.peer_client_limit,
    )
    if config.max_connections > fds - FD_RESERVE:
        log.warning(
            "max_connections %d is above the open-file limit %d: past it connections "
            "are reset unanswered; raise the limit (ulimit -n) or lower max_connections",
            config.max_connections,
            fds,
        )
    await stop.wait()
    logging.getLogger("gochan.server").info("shutting down")
    await streamer.close()


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one: every connection is a
    file descriptor, and the default max_connections is derived from it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args, driver_flags = parse_args(argv)
    raise_fd_limit()  # first: the default max_connections is derived from it
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "check_config")}
    try:
        config, sources = load(yaml_file=args.config, flags=flags, driver_flags=driver_flags)
        # Built now, so the driver's own checks are answered in one line too.
        driver = create_driver(config.driver, config.driver_options)
        authorize = JWTAuthorizer.from_config(config)  # key files read now
    except ConfigurationError as exc:
        print(f"gochan: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print("\n".join(describe(config, sources)))
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        uvloop.run(run(config, driver, authorize))
    except OSError as exc:
        print(f"gochan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
