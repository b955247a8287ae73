"""The ASGI adapter's cost, beside gochan's own server in the same run.

    pytest bench/test_asgi.py --benchmark-group-by=group

Each server is one Python process on uvloop + httptools, pinned to its own
core when there are two: gochan's server (``raw``), ``GochanASGI`` as the
whole app under uvicorn (``asgi``), and mounted at /realtime in a FastAPI app
(``fastapi``). This process holds the SSE clients (raw sockets) and times:

- ``fanout N``: POST /publish of one message, until all N streams have it;
- ``burst``: 200 pipelined POST /publish, until 10 streams have the last one.

Two ratios are printed at the end, to gochan's server: wall time per round
(the clients' own cost, the same for every server, dilutes it) and the
server process's CPU time per round (from /proc: the adapter's cost proper).
Not part of the test suite (``testpaths`` is ``tests``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

ROOT = Path(__file__).resolve().parent.parent
FANOUT_ROUNDS = 60
BURST_ROUNDS = 15
BURST_MESSAGES = 200
BURST_STREAMS = 10
BODY = b'{"payload":"Topic42 1234567890123"}'.ljust(64, b" ")

RAW = "import sys; from gochan.server.__main__ import main; sys.exit(main())"
ASGI = """
import sys, uvicorn
from gochan import Config, Streamer
from gochan.asgi import GochanASGI
realtime = GochanASGI(Streamer(Config(heartbeat=60)), publish_key_required=False)
if sys.argv[2] == "fastapi":
    from fastapi import FastAPI
    app = FastAPI(lifespan=realtime.lifespan)
    app.mount("/realtime", realtime)
else:
    app = realtime
uvicorn.run(app, port=int(sys.argv[1]), loop="uvloop", http="httptools", ws="none",
            lifespan="on", log_level="warning", access_log=False, server_header=False)
"""
SERVERS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    # name: (arguments of the interpreter for a port, path prefix)
    "raw": (lambda port: ["-c", RAW, "--heartbeat", "60", "--port", str(port)], ""),
    "asgi": (lambda port: ["-c", ASGI, str(port), "bare"], ""),
    "fastapi": (lambda port: ["-c", ASGI, str(port), "fastapi"], "/realtime"),
}
VARIANTS = list(SERVERS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin(cpu: int) -> list[int] | None:
    """Pin this process to ``cpu`` when there are two cores; the old set."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {cpus[cpu]})
    return cpus


class Server:
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.port = free_port()
        argv, self.prefix = SERVERS[name]
        cpus = sorted(os.sched_getaffinity(0))
        self.proc = subprocess.Popen(
            [sys.executable, *argv(self.port)],
            cwd=ROOT,
            preexec_fn=(lambda: os.sched_setaffinity(0, {cpus[-1]})) if len(cpus) > 1 else None,
        )
        loop.run_until_complete(self._ready())

    async def _ready(self) -> None:
        for _ in range(300):
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(f"GET {self.prefix}/readyz HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                writer.close()
                await writer.wait_closed()
                if head.startswith(b"HTTP/1.1 200"):
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Clients:
    """N SSE streams on one topic, and one keep-alive connection to publish."""

    def __init__(self, server: Server, topic: str, n: int) -> None:
        self.server = server
        self.topic = topic
        self.n = n
        self.marker = b"@@--------@@"  # no round yet; the same length as theirs
        self.remaining = 0
        self.done: asyncio.Future[None] | None = None
        self.readers: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.round = 0

    async def connect(self) -> None:
        target = f"{self.server.prefix}/events?topic={self.topic}"
        request = f"GET {target} HTTP/1.1\r\nHost: b\r\n\r\n".encode()
        for start in range(0, self.n, 100):
            opened = await asyncio.gather(
                *(self._open(request) for _ in range(start, min(self.n, start + 100)))
            )
            for reader, writer in opened:
                self.writers.append(writer)
                self.readers.append(asyncio.create_task(self._read(reader)))
        self.pub_reader, self.pub_writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port
        )
        self.publish_head = (
            f"POST {self.server.prefix}/publish?topic={self.topic} HTTP/1.1\r\n"
            "Host: b\r\nContent-Length: %d\r\n\r\n"
        )

    async def _open(self, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return reader, writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        tail = b""
        while data := await reader.read(1 << 16):
            seen = tail + data
            if self.marker in seen:
                self.remaining -= 1
                if self.remaining == 0 and self.done is not None and not self.done.done():
                    self.done.set_result(None)
            tail = seen[-(len(self.marker) - 1) :]

    def _request(self, body: bytes) -> bytes:
        return (self.publish_head % len(body)).encode() + body

    async def _responses(self, count: int) -> None:
        for _ in range(count):
            head = await self.pub_reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await self.pub_reader.readexactly(length)

    async def publish(self, messages: int) -> None:
        """``messages`` pipelined publishes; done when every stream has the last."""
        self.round += 1
        self.marker = b"@@%08d@@" % self.round
        self.remaining = self.n
        self.done = asyncio.get_running_loop().create_future()
        filler = self._request(BODY) * (messages - 1)
        self.pub_writer.write(filler + self._request(BODY + self.marker))
        await asyncio.wait_for(asyncio.gather(self._responses(messages), self.done), 30)

    async def close(self) -> None:
        for writer in [*self.writers, self.pub_writer]:
            writer.close()
        for writer in [*self.writers, self.pub_writer]:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


RESULTS: dict[str, dict[str, float]] = {}  # group -> variant -> median s per round
SERVER_CPU: dict[str, dict[str, float]] = {}  # group -> variant -> server CPU s per round


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = uvloop.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="module")
def servers(
    loop: asyncio.AbstractEventLoop, request: pytest.FixtureRequest
) -> Iterator[dict[str, Server]]:
    started = {name: Server(name, loop) for name in VARIANTS}
    old = pin(0)
    yield started
    if old is not None:
        os.sched_setaffinity(0, old)
    for server in started.values():
        server.stop()
    report(request)


def report(request: pytest.FixtureRequest) -> None:
    plugins = request.config.pluginmanager
    terminal = plugins.getplugin("terminalreporter")
    capture = plugins.getplugin("capturemanager")
    if terminal is None or not RESULTS:
        return
    lines = [""]
    for title, table in [
        # Medians: the machine may be shared, and means catch others' bursts.
        ("median wall time per round", RESULTS),
        ("server CPU time per round", SERVER_CPU),
    ]:
        lines.append(f"ASGI adapter cost, {title} (ratio to gochan's server):")
        for group, values in table.items():
            raw = values.get("raw")
            cells = []
            for name in VARIANTS:
                if name in values:
                    ratio = f" ({values[name] / raw:.2f}x)" if raw and name != "raw" else ""
                    cells.append(f"{name} {values[name] * 1e3:8.3f} ms{ratio}")
            lines.append(f"  {group:<13} " + "   ".join(cells))
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for line in lines:
            terminal.write_line(line)


def cpu_ns(pid: int) -> int:
    """CPU time the process has run, in ns (all its threads; Linux)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def run_rounds(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    clients: Clients,
    rounds: int,
    action: Callable[[], Any],
    variant: str,
) -> None:
    loop.run_until_complete(clients.connect())
    warmup = 3
    pid = clients.server.proc.pid
    try:
        before = cpu_ns(pid)
        benchmark.pedantic(
            lambda: loop.run_until_complete(action()),
            rounds=rounds,
            warmup_rounds=warmup,
            iterations=1,
        )
        server_cpu = (cpu_ns(pid) - before) / 1e9 / (rounds + warmup)
    finally:
        loop.run_until_complete(clients.close())
        time.sleep(0.2)  # let the server reap the streams before the next test
    benchmark.extra_info["server_cpu_s_per_round"] = server_cpu
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS.setdefault(benchmark.group, {})[variant] = stats.stats.median
        SERVER_CPU.setdefault(benchmark.group, {})[variant] = server_cpu


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [1, 100, 1000])
def test_fanout(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    servers: dict[str, Server],
    n: int,
    variant: str,
) -> None:
    """One POST /publish, until N streams have the message."""
    benchmark.group = f"fanout {n}"
    clients = Clients(servers[variant], f"fan{n}", n)
    run_rounds(benchmark, loop, clients, FANOUT_ROUNDS, lambda: clients.publish(1), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_burst(
    benchmark: Any,
    loop: asyncio.AbstractEventLoop,
    servers: dict[str, Server],
    variant: str,
) -> None:
    """200 pipelined POST /publish, until 10 streams have the last message."""
    benchmark.group = f"burst {BURST_MESSAGES}x{BURST_STREAMS}"
    clients = Clients(servers[variant], "burst", BURST_STREAMS)
    run_rounds(
        benchmark, loop, clients, BURST_ROUNDS, lambda: clients.publish(BURST_MESSAGES), variant
    )
