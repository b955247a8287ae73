"""PostgreSQL for the driver tests: find one, or start a throwaway cluster.

Order: ``GOCHAN_POSTGRES_DSN`` if set; else the server on 127.0.0.1:5432 if
it answers (as user ``postgres``); else a cluster of our own (``initdb`` in a
temp dir, ``postgres`` on a free port, trust auth, stopped at the end of the
session; run as user ``postgres`` when we are root, as PostgreSQL requires).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .conftest import broker_unavailable, free_port, port_open

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
START_TIMEOUT_S = 60.0


@dataclass
class Postgres:
    dsn: str
    process: subprocess.Popen[bytes] | None = None
    tmpdir: str | None = None
    # Starts the server (again, on the same port and data): start_cluster's.
    spawn: Callable[[], subprocess.Popen[bytes]] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return urlsplit(self.dsn).port or 5432

    def halt(self, sig: int = signal.SIGINT) -> None:
        """Stop the server with ``sig`` (SIGINT: fast shutdown, SIGQUIT: a
        crash without checkpoint), keeping its data for :meth:`resume`."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def resume(self) -> None:
        """Start a server stopped by :meth:`halt` again, until its port is open."""
        assert self.spawn is not None and self.process is None
        self.process = self.spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start again")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def obtain() -> Postgres:
    dsn = os.environ.get("GOCHAN_POSTGRES_DSN")
    if dsn:
        return Postgres(dsn=dsn)
    if port_open("127.0.0.1", 5432):
        return Postgres(dsn=DEFAULT_DSN)
    return start_cluster()


def _bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(Exception):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, check=True)
            bindir = out.stdout.decode().strip()
            if os.path.exists(os.path.join(bindir, "initdb")):
                return bindir
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


def start_cluster() -> Postgres:
    bindir = _bindir()
    if bindir is None:
        broker_unavailable("no PostgreSQL: GOCHAN_POSTGRES_DSN unset, 5432 closed, no initdb")
    uid: int | None = None  # None: as ourselves
    gid: int | None = None
    groups: list[int] | None = None
    tmpdir = tempfile.mkdtemp(prefix="gochan-postgres-")
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            broker_unavailable("running as root and there is no postgres user to run initdb as")
        os.chown(tmpdir, user.pw_uid, user.pw_gid)
        # Not runuser: the signals of stop() must reach postgres itself.
        uid, gid, groups = user.pw_uid, user.pw_gid, []
    data = os.path.join(tmpdir, "data")
    init = subprocess.run(
        [os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "-A", "trust"],
        capture_output=True,
        check=False,
        cwd=tmpdir,
        user=uid,
        group=gid,
        extra_groups=groups,
    )
    if init.returncode != 0:
        shutil.rmtree(tmpdir, ignore_errors=True)
        broker_unavailable(f"initdb failed: {init.stderr.decode(errors='replace')[-500:]}")
    port = free_port()

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                os.path.join(bindir, "postgres"),
                "-D",
                data,
                "-p",
                str(port),
                "-k",
                tmpdir,
                "-c",
                "listen_addresses=127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmpdir,
            user=uid,
            group=gid,
            extra_groups=groups,
        )

    process = spawn()
    server = Postgres(
        dsn=f"postgresql://postgres@127.0.0.1:{port}/postgres",
        process=process,
        tmpdir=tmpdir,
        spawn=spawn,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    # Accepting connections, not just listening: a server still starting up
    # answers "the database system is starting up" (CI saw a test fail so).
    while not accepting(bindir, port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            broker_unavailable("could not start a PostgreSQL cluster of our own")
        time.sleep(0.1)
    return server


def accepting(bindir: str, port: int) -> bool:
    """The server on ``port`` takes connections (``pg_isready``; its port
    open where there is no pg_isready)."""
    isready = os.path.join(bindir, "pg_isready")
    if not os.path.exists(isready):
        return port_open("127.0.0.1", port, 0.2)
    done = subprocess.run(
        [isready, "-q", "-h", "127.0.0.1", "-p", str(port)], check=False, timeout=10
    )
    return done.returncode == 0
