"""``python -m gochan.server``: run gochan as a standalone server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import uvloop

from ..auth import Authorize, JWTAuthorizer
from ..config import (
    DEFAULT_MAX_CONNECTIONS,
    FD_RESERVE,
    FLAG_HELP,
    Config,
    default_max_connections,
    describe,
    fd_limit,
    load,
)
from ..drivers import Driver, create_driver
from ..errors import ConfigurationError
from ..streamer import Streamer
from . import reference
from .app import SHUTDOWN_SPREAD_FRACTION

if TYPE_CHECKING:
    from .workers import WorkerSetup

# The help lines live with the settings (gochan.config.FLAG_HELP, also the
# source of docs/configuration.md); the name stays importable from here.
__all__ = ["FLAG_HELP", "main", "parse_args"]


class _Parser(argparse.ArgumentParser):
    """Builds the driver list of --help only when help is shown: it imports
    every installed driver's module."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = reference.drivers_epilog()
        return super().format_help()


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, dict[str, str | None]]:
    """The flags of Config's fields, and the others (``{"nats-url": "x"}``,
    None for a bare flag): driver options, resolved by :func:`load` once the
    driver is known from every source."""
    parser = _Parser(
        prog="python -m gochan.server",
        description="gochan: relay pub/sub messages to browsers over Server-Sent Events. "
        "Every option is also a YAML key (--config) and a GOCHAN_<NAME> variable "
        "(--client-ttl: client_ttl, GOCHAN_CLIENT_TTL); flags win over variables, which "
        "win over the file. Reference: docs/configuration.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="read settings from a YAML file")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (building the driver, without connecting), print "
        "every setting with where its value came from, secrets redacted, and exit",
    )
    for title, names in reference.field_sections():
        group = parser.add_argument_group(title)
        for name in names:
            flag = "--" + name.replace("_", "-")
            text = FLAG_HELP.get(name, "").replace("%", "%%") or None
            if str(Config.__dataclass_fields__[name].type) == "bool":
                group.add_argument(
                    flag, dest=name, action=argparse.BooleanOptionalAction, help=text
                )
            else:
                group.add_argument(flag, dest=name, metavar=name.upper(), help=text)
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
    config: Config,
    driver: Driver | None = None,
    worker: WorkerSetup | None = None,
    authorize: Authorize | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT. ``worker``: as one of the processes of
    ``--workers`` (see workers.py), which the supervisor told it."""
    streamer = Streamer(config, driver=driver, authorize=authorize)
    if worker is None:
        await streamer.start()
        server = await streamer.serve()
    else:
        server = await worker.serve(streamer)
    # What exists now (modules, config, driver) lives as long as the process:
    # keep it out of the full collections a connect storm triggers (after
    # collecting startup's garbage, which would otherwise be frozen too).
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def exit_now(signum: int) -> None:
        logging.getLogger("gochan.server").warning(
            "second signal (%s): exiting now", signal.Signals(signum).name
        )
        logging.shutdown()
        os._exit(128 + signum)  # what a shell reports for a death by that signal

    def first_signal(signum: int) -> None:
        # The graceful shutdown starts; a second signal skips it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, exit_now, sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, first_signal, sig)
    if worker is None:
        for host, port in server.sockets:
            print(f"gochan listening on http://{host}:{port} (driver {config.driver})", flush=True)
    else:
        worker.ready()  # the supervisor says it once every worker listens
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
    logging.getLogger("gochan.server").info(
        "shutting down: streams end over %.1f s, exit within %.1f s (a second signal exits now)",
        config.shutdown_grace * SHUTDOWN_SPREAD_FRACTION,
        config.shutdown_grace,
    )
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
    if config.workers > 1:
        from .workers import Supervisor

        try:
            return Supervisor(
                config, lambda: create_driver(config.driver, config.driver_options)
            ).run()
        except OSError as exc:
            print(f"gochan: {exc}", file=sys.stderr)
            return 1
    try:
        uvloop.run(run(config, driver, authorize=authorize))
    except OSError as exc:
        print(f"gochan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
