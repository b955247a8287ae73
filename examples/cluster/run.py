"""A gochan cluster on this machine, with one command: a NATS server
(JetStream on), three gochan nodes and nginx in front of them, round robin,
serving the 1000-topics page (examples/1000topics) and its publisher.

    python examples/cluster/run.py
    python examples/cluster/run.py --port 8080 --topics 1000 --interval 1

Open the URL it prints; Ctrl-C stops everything. Every program runs as a
child of this script, as the user running it, on its own ports and in a
temporary directory (removed at the end, or kept with --keep): Debian's
nats-server on a free port (never the machine's 4222), ``python -m
gochan.server --cluster`` three times, and Debian's nginx in the foreground
with a configuration written there (no system file is read or changed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

from gochan import Config, Streamer

HERE = Path(__file__).resolve().parent
PAGE = HERE.parent / "1000topics"  # the page, and the publisher reused from its server.py
NODES = ("node-a", "node-b", "node-c")
CLUSTER_NAME = "example"  # the client records: JetStream key-value bucket example_clients
STREAM = "GOCHAN_CLUSTER_EXAMPLE"  # the JetStream stream holding every message
PREFIX = "cluster-example."  # topic Topic7 is subject cluster-example.Topic7
DEFAULT_PORT = 8080  # nginx: the page and every gochan path
DEFAULT_TOPICS = 1000
# Every topic once a second: 1,000 messages/s, each stored by JetStream and
# relayed by every node holding a subscriber; 10/s per topic like the
# one-process example would be 10,000/s, more than two cores can store and
# fan out three times over.
DEFAULT_INTERVAL_S = 1.0
DEFAULT_SHUTDOWN_RETRY_MAX_S = 5.0  # a stopped node's pages come back within 1..5 s
START_TIMEOUT_S = 20.0  # for each program to come up
STOP_TIMEOUT_S = 10.0  # for each program to end once told to, before it is killed
NGINX_CANDIDATES = ("/usr/sbin/nginx",)
NATS_CANDIDATES = ("/usr/sbin/nats-server", "/usr/bin/nats-server")

# nginx in the foreground, everything under the run directory. Round robin
# over the nodes (no stickiness: any node serves any client), a node that
# refuses connections skipped for the next one, streams neither buffered nor
# cut while quiet, HTTP/1.1 and kept-alive connections to the nodes.
NGINX_CONF = """\
daemon off;
master_process off;  # one process, which dies with run.py (no worker left holding the port)
pid {run}/nginx.pid;
error_log {run}/nginx-error.log notice;
events {{ worker_connections 1024; }}

http {{
    # Which node answered each request, and the Last-Event-ID a reconnecting
    # browser sent: tail {run}/nginx-access.log to watch a failover.
    log_format cluster '$remote_addr "$request" $status node=$upstream_http_x_gochan_node '
                       'upstream=$upstream_addr last_event_id="$http_last_event_id" '
                       'time=$request_time';
    access_log {run}/nginx-access.log cluster;
    client_body_temp_path {run}/nginx-body;
    proxy_temp_path {run}/nginx-proxy;
    fastcgi_temp_path {run}/nginx-fastcgi;
    uwsgi_temp_path {run}/nginx-uwsgi;
    scgi_temp_path {run}/nginx-scgi;

    upstream gochan {{
{servers}
        keepalive 32;                       # reuse connections for publishes and updates
    }}

    server {{
        listen {host}:{port};

        location / {{
            proxy_pass http://gochan;
            proxy_http_version 1.1;         # HTTP/1.1 to the nodes: keep-alive, streamed answers
            proxy_set_header Connection ""; # no "Connection: close" to the nodes
            proxy_set_header Host $http_host;   # the browser's Host, port included (Origin checks)
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;

            proxy_buffering off;            # every frame to the browser at once
            proxy_cache off;
            proxy_read_timeout 1h;          # far above the heartbeat (15 s): quiet streams live
            proxy_send_timeout 1h;
            proxy_connect_timeout 2s;
            proxy_next_upstream error timeout;  # a dead node's requests go to the others
        }}
    }}
}}
"""


SIGNALLED = "a signal"


class StartError(Exception):
    """A program of the cluster is missing or did not come up."""


def thousand_topics() -> ModuleType:
    """examples/1000topics/server.py, whose publisher this cluster runs."""
    spec = importlib.util.spec_from_file_location("thousand_topics", PAGE / "server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def program(name: str, candidates: tuple[str, ...], package: str) -> str:
    found = shutil.which(name) or next((p for p in candidates if os.access(p, os.X_OK)), None)
    if found is None:
        raise StartError(f"{name} is not installed (apt-get install {package})")
    return found


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class Child:
    """One program of the cluster, its output in a log file. It runs in a
    session of its own: Ctrl-C reaches this script only, which stops the
    programs in order (the publisher and the nodes before NATS: a NATS
    client closed while its server goes away can take half a minute). With
    util-linux's setpriv it is also killed if this script is."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, stdout_pipe: bool = False) -> None:
        setpriv = shutil.which("setpriv")
        argv = [setpriv, "--pdeathsig", "KILL", "--", *self.argv] if setpriv else self.argv
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


class Cluster:
    def __init__(self, args: argparse.Namespace, run: Path) -> None:
        self.args = args
        self.run = run
        self.host = args.host
        self.nats_port = args.nats_port or free_port(self.host)
        self.nats_url = f"nats://{self.host}:{self.nats_port}"
        self.nats: Child | None = None
        self.nodes: dict[str, tuple[Child, int]] = {}  # node id -> (process, port)
        self.nginx: Child | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # the nodes' output read into their logs

    def driver_options(self) -> dict[str, object]:
        return {"url": self.nats_url, "prefix": PREFIX, "jetstream": True, "stream": STREAM}

    async def start(self) -> None:
        await self.start_nats()
        for node in NODES:
            await self.start_node(node)
        await self.wait_whole_cluster()
        await self.start_nginx()

    async def start_nats(self) -> None:
        binary = program("nats-server", NATS_CANDIDATES, "nats-server")
        store = self.run / "nats"
        store.mkdir()
        argv = [binary, "-a", self.host, "-p", str(self.nats_port), "-js", "-sd", str(store)]
        self.nats = Child("nats", argv, self.run / "nats.log")
        await self.nats.start()
        await self.wait(self.nats, lambda: port_open(self.host, self.nats_port))

    async def start_node(self, node: str) -> None:
        argv = [
            sys.executable, "-m", "gochan.server",
            "--host", self.host, "--port", "0",
            "--driver", "nats", "--nats-url", self.nats_url, "--nats-prefix", PREFIX,
            "--nats-jetstream", "--nats-stream", STREAM,
            "--cluster", "--cluster-name", CLUSTER_NAME, "--node-id", node,
            "--static-dir", str(PAGE),
            "--shutdown-retry-max", str(self.args.shutdown_retry_max),
            "--shutdown-retry-min", str(min(1.0, self.args.shutdown_retry_max)),
        ]  # fmt: skip
        child = Child(node, argv, self.run / f"{node}.log")
        await child.start(stdout_pipe=True)
        assert child.proc is not None and child.proc.stdout is not None
        try:  # "gochan listening on http://127.0.0.1:PORT (driver nats)"
            line = await asyncio.wait_for(child.proc.stdout.readline(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            line = b""
        match = re.search(rb"listening on http://[^\s]+:(\d+)", line)
        if match is None:
            raise StartError(f"{node} did not start:\n{child.tail()}")
        port = int(match[1])
        self.nodes[node] = (child, port)
        self.tasks.add(asyncio.create_task(self.drain(child)))
        await self.wait(child, lambda: self.ready(port) is not None)

    @staticmethod
    async def drain(child: Child) -> None:
        """The node's stdout into its log (it prints little past its banner)."""
        assert child.proc is not None and child.proc.stdout is not None
        with child.log.open("ab") as log:
            while line := await child.proc.stdout.readline():
                log.write(line)
                log.flush()

    def ready(self, port: int) -> str | None:
        """The node's /readyz answer while it is ready, else None."""
        try:
            with urllib.request.urlopen(f"http://{self.host}:{port}/readyz", timeout=2) as r:
                return str(r.read().decode())
        except (OSError, urllib.error.URLError):
            return None

    async def wait_whole_cluster(self) -> None:
        """Until every node hears every other (its /readyz names them all)."""

        def whole() -> bool:
            for _, port in self.nodes.values():
                answer = self.ready(port) or ""
                match = re.search(r"nodes (.*)$", answer, re.M)
                if match is None or set(match[1].split()) != set(NODES):
                    return False
            return True

        deadline = time.monotonic() + START_TIMEOUT_S
        while not await asyncio.to_thread(whole):
            if time.monotonic() > deadline:
                raise StartError("the nodes did not all hear each other")
            await asyncio.sleep(0.2)

    async def start_nginx(self) -> None:
        binary = program("nginx", NGINX_CANDIDATES, "nginx")
        if port_open(self.host, self.args.port):
            raise StartError(f"{self.host}:{self.args.port} is taken: choose another --port")
        servers = "\n".join(
            f"        server {self.host}:{port};  # {node}"
            for node, (_, port) in self.nodes.items()
        )
        conf = self.run / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(run=self.run, host=self.host, port=self.args.port, servers=servers)
        )
        error_log = str(self.run / "nginx-error.log")
        argv = [binary, "-p", str(self.run), "-e", error_log, "-c", str(conf)]
        self.nginx = Child("nginx", argv, self.run / "nginx.log")
        await self.nginx.start()
        await self.wait(self.nginx, lambda: port_open(self.host, self.args.port))

    async def wait(self, child: Child, up: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not await asyncio.to_thread(up):
            if child.exited() is not None or time.monotonic() > deadline:
                raise StartError(f"{child.name} did not come up:\n{child.tail()}")
            await asyncio.sleep(0.1)

    async def watch(self) -> str:
        """Until a program of the cluster exits by itself: which one. A
        node killed on purpose (to see the others take over) is said once
        and not waited on."""
        said: set[str] = set()
        while True:
            for child in (self.nats, self.nginx):
                if child is not None and child.exited() is not None:
                    print(f"cluster: {child.name} exited; its log:\n{child.tail()}", flush=True)
                    return child.name
            for node, (child, _) in self.nodes.items():
                code = child.exited()
                if code is not None and node not in said:
                    said.add(node)
                    print(
                        f"cluster: {node} exited ({code}); nginx sends its share to the others",
                        flush=True,
                    )
            if len(said) == len(self.nodes):
                return "every node"
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """The nodes first (their streams are told when to come back, through
        nginx), then nginx, then NATS."""
        await asyncio.gather(*(child.stop() for child, _ in self.nodes.values()))
        if self.nginx is not None:
            await self.nginx.stop(signal.SIGQUIT)
        if self.nats is not None:
            await self.nats.stop()

    def banner(self) -> str:
        args = self.args
        rate = args.topics / args.interval
        url = f"http://{self.host}:{args.port}/"
        lines = [f"nats    {self.nats_url} (JetStream; pid {self.nats.pid if self.nats else 0})"]
        for node, (child, port) in self.nodes.items():
            lines.append(f"{node}  http://{self.host}:{port}/ (pid {child.pid})")
        lines += [
            f"nginx   {url} round robin over {' '.join(self.nodes)}",
            f"publisher: {args.topics} topics, each one message every {args.interval:g}s "
            f"({rate:,.0f} messages/s) into JetStream stream {STREAM}",
            f"logs in {self.run}",
            f"cluster: open {url}?n={args.topics} (Ctrl-C stops everything)",
        ]
        return "\n".join(lines)


THOUSAND_TOPICS = thousand_topics()


async def until_stopped(job: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``job`` unless ``stop`` is set first: True when it ran to its end."""
    running = asyncio.ensure_future(job)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not running.done():
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return False
    running.result()  # its exception, if it failed
    return True


async def serve(cluster: Cluster, stop: asyncio.Event) -> str:
    """Publish until a signal or until a program exits: what ended it."""
    args = cluster.args
    config = Config(driver="nats", driver_options=cluster.driver_options())
    topics = [f"Topic{i}" for i in range(args.topics)]
    async with Streamer(config) as streamer:
        publisher = asyncio.create_task(
            THOUSAND_TOPICS.publish_forever(streamer, topics, args.interval)
        )
        print(cluster.banner(), flush=True)
        watcher = asyncio.create_task(cluster.watch())
        stopped = asyncio.create_task(stop.wait())
        tasks = (publisher, watcher, stopped)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            ended = f"{watcher.result()} exited"
        elif publisher.done():
            ended = f"the publisher failed: {publisher.exception()!r}"
        else:
            ended = SIGNALLED
        for task in tasks:
            await cancel(task)
    return ended


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` until it ends: nats-py swallows a cancellation that
    lands inside a publish, and the publisher would go on publishing."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.1)


async def main(args: argparse.Namespace) -> int:
    run = Path(tempfile.mkdtemp(prefix="gochan-cluster-"))
    cluster = Cluster(args, run)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        ended = await serve(cluster, stop) if await until_stopped(cluster.start(), stop) else ""
    except StartError as exc:
        print(f"cluster: {exc}", file=sys.stderr, flush=True)
        ended = "it did not start"
    finally:
        print(f"cluster: stopping ({ended or SIGNALLED})", flush=True)
        await cluster.stop()
        if args.keep:
            print(f"cluster: logs kept in {run}", flush=True)
        else:
            shutil.rmtree(run, ignore_errors=True)
    return 0 if ended in ("", SIGNALLED) else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    positive = THOUSAND_TOPICS.positive
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="where everything listens")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT,
        help=f"nginx's port: the page and every gochan path (default {DEFAULT_PORT})",
    )  # fmt: skip
    parser.add_argument(
        "--nats-port", type=int, default=0, help="the NATS server's port (default: a free one)"
    )
    parser.add_argument(
        "--topics", type=positive(int), default=DEFAULT_TOPICS,
        help=f"number of topics, Topic0 ... (default {DEFAULT_TOPICS})",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=positive(float), default=DEFAULT_INTERVAL_S,
        help=f"seconds between two messages on one topic (default {DEFAULT_INTERVAL_S:g})",
    )  # fmt: skip
    parser.add_argument(
        "--shutdown-retry-max", type=positive(float), default=DEFAULT_SHUTDOWN_RETRY_MAX_S,
        help="when a node stops, the longest its pages wait before they reconnect, "
        f"in seconds (default {DEFAULT_SHUTDOWN_RETRY_MAX_S:g})",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the logs and the NATS store")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(uvloop.run(main(parse())))
