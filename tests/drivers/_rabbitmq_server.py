"""RabbitMQ for the driver tests: find one, or start a throwaway node.

Order: ``GOCHAN_RABBITMQ_URL`` if set; else the broker on 127.0.0.1:5672 if it
answers; else a node of our own (``rabbitmq-server`` with its own name, ports
and data directory, stopped at the end of the session).

Also here: :func:`rabbitmqctl` to act on the broker from the server side, and
:class:`TcpProxy`, a loopback TCP relay whose ``stop()`` drops every
connection and refuses new ones until ``start()``: a broker outage seen from
the client, without disturbing the broker other people use.
"""

from __future__ import annotations

import asyncio
import contextlib
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

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
REAL_SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
NODE_START_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 60.0


@dataclass
class RabbitMQ:
    url: str
    node: str | None = None  # for rabbitmqctl -n; None: the default node
    local: bool = True  # rabbitmqctl can reach it
    process: subprocess.Popen[bytes] | None = None
    tmpdir: str | None = None
    # Starts the node (again, on the same ports and data): start_node's nodes.
    spawn: Callable[[], subprocess.Popen[bytes]] | None = field(default=None, repr=False)
    _ctl_checked: bool | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 5672

    def ctl_available(self) -> bool:
        """Whether rabbitmqctl can act on this broker."""
        if self._ctl_checked is None:
            self._ctl_checked = False
            if self.local and shutil.which("rabbitmqctl"):
                with contextlib.suppress(Exception):
                    self.ctl("list_connections", "name")
                    self._ctl_checked = True
        return self._ctl_checked

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this broker; its stdout."""
        node = ["-n", self.node] if self.node else []
        result = subprocess.run(
            ["rabbitmqctl", *node, "-q", *args],
            capture_output=True,
            timeout=CTL_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed: {result.stderr.decode(errors='replace')}"
            )
        return result.stdout.decode(errors="replace")

    def bindings(self, exchange: str, vhost: str = "/") -> set[tuple[str, str]]:
        """(queue, routing key) of every binding from ``exchange``."""
        out = self.ctl(
            "list_bindings",
            "-p",
            vhost,
            "source_name",
            "destination_name",
            "routing_key",
            "--no-table-headers",
        )
        found = set()
        for line in out.splitlines():
            source, destination, key = [*line.split("\t"), "", "", ""][:3]
            if source == exchange:
                found.add((destination, key))
        return found

    def connection_pids(self, connection_name: str) -> list[str]:
        """Erlang pids of the connections whose client named them so."""
        out = self.ctl("list_connections", "pid", "client_properties", "--no-table-headers")
        pids = []
        for line in out.splitlines():
            pid, _, props = line.partition("\t")
            if f'"{connection_name}"' in props or f'<<"{connection_name}">>' in props:
                pids.append(pid.strip())
        return pids

    def close_connections(self, connection_name: str, reason: str = "gochan test") -> int:
        """Close, from the server side, the connections named so; how many."""
        pids = self.connection_pids(connection_name)
        for pid in pids:
            self.ctl("close_connection", pid, reason)
        return len(pids)

    def halt(self, sig: int = signal.SIGTERM) -> None:
        """Stop the node's processes with ``sig`` (SIGKILL: a crash), keeping
        its data for :meth:`resume`."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(CTL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def resume(self) -> None:
        """Start a node stopped by :meth:`halt` again, until its port is open."""
        assert self.spawn is not None and self.process is None
        self.process = self.spawn()
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the RabbitMQ node did not start again")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.ctl("stop")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def obtain() -> RabbitMQ:
    url = os.environ.get("GOCHAN_RABBITMQ_URL")
    if url:
        parts = urlsplit(url)
        # rabbitmqctl reaches the default local node only.
        local = parts.hostname in ("127.0.0.1", "localhost", "::1") and parts.port in (None, 5672)
        return RabbitMQ(url=url, local=local)
    if port_open("127.0.0.1", 5672):
        return RabbitMQ(url=DEFAULT_URL)
    return start_node()


def start_node() -> RabbitMQ:
    """A RabbitMQ node of our own, on free ports, with its data in a temp dir."""
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that su's to the
    # rabbitmq user and loses our environment: run the real script.
    server = REAL_SERVER_SCRIPT if os.path.exists(REAL_SERVER_SCRIPT) else None
    server = server or shutil.which("rabbitmq-server")
    if server is None:
        broker_unavailable(
            "no RabbitMQ: GOCHAN_RABBITMQ_URL unset, 5672 closed, no rabbitmq-server"
        )
    port = free_port()
    tmpdir = tempfile.mkdtemp(prefix="gochan-rabbitmq-")
    node = f"gochan-test-{port}@localhost"
    uid: int | None = None  # None: as ourselves
    gid: int | None = None
    home = os.environ.get("HOME", tmpdir)
    if os.geteuid() == 0:
        # As the rabbitmq user, with its Erlang cookie: rabbitmqctl (which
        # also runs as that user) can then reach the node.
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("rabbitmq")
            uid, gid, home = user.pw_uid, user.pw_gid, user.pw_dir
            os.chown(tmpdir, uid, gid)
    env = {
        **os.environ,
        "HOME": home,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": os.path.join(tmpdir, "mnesia"),
        "RABBITMQ_LOG_BASE": os.path.join(tmpdir, "log"),
        "RABBITMQ_PID_FILE": os.path.join(tmpdir, "pid"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(tmpdir, "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": os.path.join(tmpdir, "rabbitmq"),
    }
    for name, text in (("enabled_plugins", "[].\n"), ("rabbitmq.conf", "loopback_users = none\n")):
        path = os.path.join(tmpdir, name)
        with open(path, "w") as f:
            f.write(text)
        if uid is not None and gid is not None:
            os.chown(path, uid, gid)

    def spawn() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [server],
            env=env,
            cwd=tmpdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )

    process = spawn()
    broker = RabbitMQ(
        url=f"amqp://guest:guest@127.0.0.1:{port}/",
        node=node,
        process=process,
        tmpdir=tmpdir,
        spawn=spawn,
    )
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while not port_open("127.0.0.1", port, 0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            broker.stop()
            broker_unavailable(f"could not start a RabbitMQ node with {server}")
        time.sleep(0.2)
    return broker


class TcpProxy:
    """A loopback TCP relay to ``target``; ``stop()`` is an outage, ``start()`` ends it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0

    async def start(self) -> None:
        """Listen (on the same port as before after a stop)."""
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(self.target_host, self.target_port)
            self._writers.add(upstream)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()
