"""Attack benchmark: the attacks of issue 10 against a real gochan server, one
figure per item, so that the same command run on the commit before the fixes
(``--rev 2a540e9``) and on the current tree can be compared side by side.

Each item starts its own ``python -m gochan.server`` (or several) on a free
loopback port, with its output captured under bench/results/attacks-<stamp>/,
attacks it, reads what it did from /proc and /metrics, and stops it. Every
wait is bounded; all traffic goes to 127.0.0.0/8 (the second peer of the
lock-out item is 127.0.0.2).

Items (``--only NAME``, repeatable):

    unread_pipeline   pipelined GET /gochan.js never read: RSS held, and dropped?
    update_stall      100,000-topic update_subscriptions floods vs a healthy stream
    sigterm_backlog   SIGTERM with 100 backlogged streams: backlog and Client closed
    slow_consumers    100 stuck streams: bytes before the cut, FIN-WAIT-1, reset
    lockout           one address filling --max-connections / --max-clients
    cross_site        keyless publish with a foreign Origin / a rebound Host
    small             GET /%00 with --static-dir, %FF vs %FE, a non-ASCII key
    expect_continue   100 Continue in turn, and not before a refusal

Usage:
    python bench/attacks.py --rev 2a540e9 --json bench/results/attacks-old.json
    python bench/attacks.py --rev HEAD --json bench/results/attacks-new.json
    python bench/attacks.py --compare bench/results/attacks-old.json \\
        bench/results/attacks-new.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _server
import uvloop
from _server import RESULTS, free_port, rss_kib, stop_process

IO_TIMEOUT_S = 5.0
MIB = 1024 * 1024
PAGE = 4096  # /proc/net/sockstat counts TCP memory in pages

# unread_pipeline
PIPELINE_REQUEST = b"GET /gochan.js HTTP/1.1\r\nHost: x\r\n\r\n"
PIPELINE_COUNT = 20_000
PIPELINE_STUFF_S = 2.0  # write as much as the server takes within this
PIPELINE_SETTLE_S = 1.0  # then read VmRSS
PIPELINE_TIMEOUTS_S = 2.0  # --keepalive-timeout and --header-timeout
PIPELINE_GONE_WAIT_S = 10.0
UNREAD_RCVBUF = 4096

# update_stall
STALL_TOPICS = 100_000
STALL_PUBLISH_EVERY_S = 0.010
STALL_BEFORE_S = 1.0  # healthy latency before the flood
STALL_FLOOD_S = 5.0
STALL_AFTER_S = 0.5

# sigterm_backlog
BACKLOG_STREAMS = 100
BACKLOG_MESSAGES = 300
BACKLOG_GRACE_S = 10.0
BACKLOG_READ_S = 30.0  # every stream read to its end within this
BACKLOG_BATCH = 100  # messages between two looks at the kernel send queues
BACKLOG_FILL_MAX = 6000  # 6 MB per stream: above any kernel buffer here (tcp_wmem 4 MiB)
PAYLOAD = b"x" * 1000
CLIENT_CLOSED = b"event: message\ndata: Client closed\n\n"

# slow_consumers
SLOW_STREAMS = 100
SLOW_MAX_MESSAGES = 20_000  # 20 MB per stream: far past any cut
SLOW_MAX_S = 60.0
SLOW_CHECK_EVERY = 20  # messages between two reads of the counter
SLOW_READ_S = 30.0
TCP_FIN_WAIT1 = "04"  # /proc/net/tcp state codes
TCP_LISTEN = "0A"
TCP_ESTABLISHED = "01"

# lockout
LOCKOUT_CONNECTIONS = 300
LOCKOUT_CLIENTS = 2000
LOCKOUT_CONCURRENCY = 50
OTHER_PEER = "127.0.0.2"
# /metrics is read from an address no attack uses, so an attack's share of
# its own address (the connection rate, the per-peer limits) does not refuse it.
METRICS_PEER = "127.0.0.9"

Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[attacks] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the server


class Server:
    def __init__(self, proc: subprocess.Popen[Any], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024

    def metrics(self) -> dict[str, float]:
        """Every unlabelled sample of /metrics (one request, its own connection)."""
        status, body = http(
            self.port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n", METRICS_PEER
        )
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}")
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                values[name] = float(value)
        return values

    def metric(self, name: str) -> float:
        return self.metrics().get(name, float("nan"))

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Run:
    """One run: the tree the servers come from, their logs, and the figures."""

    def __init__(self, tree: Path, logs: Path) -> None:
        self.tree = tree
        self.logs = logs
        self.figures: dict[str, dict[str, Any]] = {}
        self.item = ""

    def add(self, figure: str, value: Any) -> None:
        self.figures.setdefault(self.item, {})[figure] = value
        log(f"{self.item}: {figure} = {value}")

    @contextlib.contextmanager
    def server(self, name: str, *flags: str) -> Iterator[Server]:
        port = free_port()
        cmd = _server.server_command(port, ["--log-level", "warning", *flags])
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = _server.start_server(cmd, self.tree, port, out)
        try:
            yield Server(proc, port, log_path)
        finally:
            stop_process(proc, log)


# ---------------------------------------------------------------- HTTP over raw sockets


def connect(
    port: int, source: str = "127.0.0.1", rcvbuf: int = 0, timeout: float = IO_TIMEOUT_S
) -> socket.socket:
    sock = socket.socket()
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class Reader:
    """Buffered reads of HTTP/1.1 answers from a blocking socket (with a timeout)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF after {len(self.buf)} bytes")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(sep)
        return head + sep

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"EOF after {len(self.buf)} of {n} bytes")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> tuple[int, bytes]:
        head = self.until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, self.exactly(length)


def http(
    port: int, request: bytes, source: str = "127.0.0.1", timeout: float = IO_TIMEOUT_S
) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    with connect(port, source, timeout=timeout) as sock:
        sock.sendall(request)
        return Reader(sock).response()


def outcome(sock: socket.socket, request: bytes, timeout: float = 3.0) -> str:
    """What a request on ``sock`` got: its status, or how the connection failed."""
    sock.settimeout(timeout)
    try:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                return "EOF, no answer" if not data else f"EOF after {data[:40]!r}"
            data += chunk
        return data.split(b" ", 2)[1].decode()
    except ConnectionResetError:
        return "reset"
    except BrokenPipeError:
        return "broken pipe"
    except TimeoutError:
        return f"no answer in {timeout:g} s"


def publish_request(topic: str, body: bytes, headers: str = "", host: str = "localhost") -> bytes:
    return (
        f"POST /publish?topic={topic} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Length: {len(body)}\r\n{headers}\r\n"
    ).encode() + body


def status(answer: bytes) -> str:
    """The status code of the first answer in ``answer``."""
    if not answer.startswith(b"HTTP/"):
        return f"no answer ({answer[:30]!r})"
    return answer.split(b" ", 2)[1].decode()


def raw(port: int, request: bytes, timeout: float = IO_TIMEOUT_S) -> bytes:
    """Send ``request`` and read until EOF or ``timeout`` (send Connection: close)."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                data += chunk
        return data


def open_stream(port: int, topic: str, rcvbuf: int = 0, source: str = "127.0.0.1") -> Any:
    """GET /events; returns (socket, the bytes after the head, the client id),
    once the first frame (the config) has arrived."""
    sock = connect(port, source, rcvbuf)
    sock.sendall(f"GET /events?topic={topic} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    reader = Reader(sock)
    head = reader.until(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise RuntimeError(f"GET /events answered {head[:40]!r}")
    first = reader.until(b"\n\n")
    found = re.search(rb'"client_id":"([^"]+)"', first)
    return sock, reader.buf, found.group(1).decode() if found else ""


# ---------------------------------------------------------------- 1. unread pipeline


def stuff(socks: list[socket.socket], data: bytes, seconds: float) -> list[int]:
    """Write as much of ``data`` on every socket as the server takes within
    ``seconds`` (non-blocking, round robin); the bytes each one took."""
    for sock in socks:
        sock.setblocking(False)
    sent = [0] * len(socks)
    done = [False] * len(socks)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not all(done):
        progress = False
        for i, sock in enumerate(socks):
            if done[i]:
                continue
            try:
                sent[i] += sock.send(data[sent[i] : sent[i] + 65536])
                progress = True
            except BlockingIOError:
                pass
            except OSError:
                done[i] = True  # closed by the server
            done[i] = done[i] or sent[i] >= len(data)
        if not progress:
            time.sleep(0.005)
    return sent


def connections_left(srv: Server) -> str:
    """gochan_connections less the /metrics request itself, or why unknown."""
    try:
        return f"{srv.metric('gochan_connections') - 1:.0f}"
    except (OSError, EOFError, RuntimeError) as exc:
        return f"unknown (/metrics: {type(exc).__name__})"


def unread_pipeline(run: Run) -> None:
    t = f"{PIPELINE_TIMEOUTS_S:g}"
    for n in (1, 4):
        with run.server(f"unread-{n}", "--keepalive-timeout", t, "--header-timeout", t) as srv:
            time.sleep(0.3)
            base = srv.rss_mib()
            socks = [connect(srv.port, rcvbuf=UNREAD_RCVBUF) for _ in range(n)]
            try:
                sent = sum(stuff(socks, PIPELINE_REQUEST * PIPELINE_COUNT, PIPELINE_STUFF_S))
                time.sleep(PIPELINE_SETTLE_S)
                grown = srv.rss_mib() - base
                run.add(f"{n} conn: bytes sent", sent)
                run.add(f"{n} conn: RSS growth after 1 s (MiB)", round(grown, 1))
                run.add(f"{n} conn: amplification (x)", round(grown * MIB / max(sent, 1)))
                t0 = time.monotonic()
                left = connections_left(srv)
                while left != "0" and time.monotonic() - t0 < PIPELINE_GONE_WAIT_S:
                    time.sleep(0.2)
                    left = connections_left(srv)
                waited = time.monotonic() - t0
                run.add(
                    f"{n} conn: connections left after the keep-alive timeout",
                    f"{left} after {waited:.1f} s",
                )
                run.add(f"{n} conn: RSS growth then (MiB)", round(srv.rss_mib() - base, 1))
            finally:
                for sock in socks:
                    sock.close()


# ---------------------------------------------------------------- 2. update stall


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def flood(port: int, request: bytes) -> tuple[collections.Counter[str], list[float]]:
    """POST ``request`` back to back for STALL_FLOOD_S from 127.0.0.3, on one
    keep-alive connection (a new one when the server closes it), in a thread
    of its own with blocking sockets, so that the event loop measuring the
    healthy stream carries none of it. Statuses and answer times."""
    statuses: collections.Counter[str] = collections.Counter()
    answer_s: list[float] = []
    t_end = time.monotonic() + STALL_FLOOD_S
    sock: socket.socket | None = None
    reader = None
    try:
        while time.monotonic() < t_end:
            try:
                if sock is None:
                    sock = connect(port, "127.0.0.3")
                    reader = Reader(sock)
                assert reader is not None
                t0 = time.monotonic()
                sock.sendall(request)
                code, _ = reader.response()
                answer_s.append(time.monotonic() - t0)
                statuses[str(code)] += 1
            except (OSError, EOFError) as exc:
                statuses[type(exc).__name__] += 1
                if sock is not None:
                    sock.close()
                sock = None
    finally:
        if sock is not None:
            sock.close()
    return statuses, answer_s


async def _stall(port: int) -> Json:
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float]] = []  # (received at, latency s)
    pub_statuses: collections.Counter[int] = collections.Counter()
    stop = asyncio.Event()

    async def healthy() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events?topic=h HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
        try:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    frame = await asyncio.wait_for(reader.readuntil(b"\n\n"), 0.5)
                    now = time.monotonic()
                    found = re.search(rb"data: ts (\d+)", frame)
                    if found:
                        samples.append((now, now - int(found.group(1)) / 1e9))
        finally:
            writer.close()

    async def publisher() -> None:
        """A timestamped publish every 10 ms, never waiting for the answers
        (a drain task reads them), so a stalled loop shows as latency."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def drain() -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    pub_statuses[int(head.split()[1])] += 1
                    m = re.search(rb"(?i)content-length: *(\d+)", head)
                    await reader.readexactly(int(m.group(1)) if m else 0)

        draining = asyncio.create_task(drain())
        try:
            nxt = time.monotonic()
            while not stop.is_set():
                body = b"ts %d" % time.monotonic_ns()
                writer.write(publish_request("h", body))
                nxt += STALL_PUBLISH_EVERY_S
                await asyncio.sleep(max(0.0, nxt - time.monotonic()))
            await asyncio.sleep(0.2)
        finally:
            draining.cancel()
            writer.close()

    # A client id of its own, minted by the attacker on another address.
    _, _, client_id = await loop.run_in_executor(None, open_stream, port, "own", 0, "127.0.0.3")
    body = json.dumps(
        {"client_id": client_id, "add": [f"t{i}" for i in range(STALL_TOPICS)]},
        separators=(",", ":"),
    ).encode()
    request = (
        b"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    tasks = [asyncio.create_task(healthy()), asyncio.create_task(publisher())]
    await asyncio.sleep(STALL_BEFORE_S)
    t_start = time.monotonic()
    flood_statuses, answer_s = await loop.run_in_executor(None, flood, port, request)
    flood_end = time.monotonic()
    await asyncio.sleep(STALL_AFTER_S)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    before = [lat for at, lat in samples if at < t_start]
    during = [lat for at, lat in samples if t_start <= at < flood_end + 0.1]
    return {
        "body_bytes": len(body),
        "before": before,
        "during": during,
        "flood": flood_statuses,
        "answer_s": answer_s,
        "publishes": pub_statuses,
    }


def update_stall(run: Run) -> None:
    with run.server("update-stall") as srv:
        r = uvloop.run(_stall(srv.port))
    before, during = r["before"], r["during"]
    ms = 1000.0
    run.add("body (bytes)", r["body_bytes"])
    run.add("healthy p99 before the flood (ms)", round(percentile(before, 0.99) * ms, 2))
    run.add("healthy p50 during the flood (ms)", round(percentile(during, 0.50) * ms, 2))
    run.add("healthy p99 during the flood (ms)", round(percentile(during, 0.99) * ms, 2))
    run.add("healthy max during the flood (ms)", round(max(during, default=0) * ms, 2))
    run.add("healthy messages received during the flood", len(during))
    run.add("oversized requests answered in 5 s", len(r["answer_s"]))
    run.add("their statuses", dict(r["flood"]))
    if r["answer_s"]:
        run.add("answer time p50 (ms)", round(statistics.median(r["answer_s"]) * ms, 1))
    run.add("publish statuses", {str(k): v for k, v in r["publishes"].items()})


# ---------------------------------------------------------------- 3. SIGTERM backlog


def read_all(socks: list[socket.socket], seconds: float) -> tuple[list[bytes], list[str]]:
    """Read every socket to its end, all at once, within ``seconds``: the
    bytes and how each ended (EOF, reset, timeout)."""
    data = [b""] * len(socks)
    ends = ["timeout"] * len(socks)
    with selectors.DefaultSelector() as sel:
        for i, sock in enumerate(socks):
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + seconds
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                i, sock = key.data, key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk, ends[i] = b"", "reset"
                else:
                    if not chunk:
                        ends[i] = "EOF"
                if chunk:
                    data[i] += chunk
                else:
                    sel.unregister(sock)
    return data, ends


def publish_many(port: int, topic: str, bodies: Iterator[bytes]) -> collections.Counter[int]:
    """POST every body in turn on one keep-alive connection; status counts."""
    statuses: collections.Counter[int] = collections.Counter()
    with connect(port) as sock:
        reader = Reader(sock)
        for body in bodies:
            sock.sendall(publish_request(topic, body))
            statuses[reader.response()[0]] += 1
    return statuses


def send_queues(port: int, state: str = TCP_ESTABLISHED) -> list[int]:
    """Bytes in the send queue of each socket in ``state`` whose local port is ``port``."""
    queues = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    queues.append(int(fields[4].split(":")[0], 16))
    return queues


def fill_kernel(port: int, topic: str, first: int) -> int:
    """Publish in batches until the streams' kernel send queues stop growing
    (the kernel buffer is full, so what follows waits in gochan's queues);
    the number of the next message."""
    seq, prev = first, -1
    while seq - first < BACKLOG_FILL_MAX:
        publish_many(port, topic, (b"%d " % i + PAYLOAD for i in range(seq, seq + BACKLOG_BATCH)))
        seq += BACKLOG_BATCH
        time.sleep(0.1)
        queues = send_queues(port)
        mean = sum(queues) // max(len(queues), 1)
        if mean - prev < BACKLOG_BATCH * len(PAYLOAD) // 10:
            return seq
        prev = mean
    return seq


def watch_exit(proc: subprocess.Popen[Any], timeout: float) -> tuple[threading.Thread, list[float]]:
    """A thread that waits for ``proc`` to exit; the list gets the time it did."""
    exited: list[float] = []

    def wait() -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
            exited.append(time.monotonic())

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, exited


def sigterm_backlog(run: Run) -> None:
    grace = f"{BACKLOG_GRACE_S:g}"
    for deep in (False, True):
        name = "past the kernel buffer" if deep else f"{BACKLOG_MESSAGES} msgs"
        with run.server("sigterm", "--shutdown-grace", grace, "--heartbeat", "60") as srv:
            streams = [open_stream(srv.port, "b", UNREAD_RCVBUF) for _ in range(BACKLOG_STREAMS)]
            socks = [s for s, _, _ in streams]
            try:
                start = fill_kernel(srv.port, "b", 0) if deep else 0
                total = start + BACKLOG_MESSAGES
                bodies = (b"%d " % i + PAYLOAD for i in range(start, total))
                statuses = publish_many(srv.port, "b", bodies)
                time.sleep(0.3)
                queued = send_queues(srv.port)
                if deep:
                    run.add(f"{name}: messages until the kernel buffer was full", start)
                run.add(f"{name}: messages published (answered 200)", statuses.get(200, 0) + start)
                run.add(
                    f"{name}: KiB in the kernel per stream before SIGTERM (mean)",
                    round(sum(queued) / max(len(queued), 1) / 1024),
                )
                t0 = time.monotonic()
                srv.proc.send_signal(signal.SIGTERM)
                waiter, exited = watch_exit(srv.proc, BACKLOG_READ_S)
                data, ends = read_all(socks, BACKLOG_READ_S)
                waiter.join(BACKLOG_READ_S)
            finally:
                for sock in socks:
                    sock.close()
            complete = closed = lost = 0
            for (_, early, _), got in zip(streams, data, strict=True):
                got = early + got
                numbers = [int(n) for n in re.findall(rb"\ndata: (\d+) x", b"\n" + got)]
                ends_closed = got.endswith(CLIENT_CLOSED)
                closed += ends_closed
                complete += numbers == list(range(total)) and ends_closed
                lost += total - len(set(numbers))
            run.add(f"{name}: streams with every message + Client closed", complete)
            run.add(f"{name}: streams ending with Client closed", closed)
            run.add(f"{name}: frames lost in total", lost)
            run.add(f"{name}: stream ends", dict(collections.Counter(ends)))
            took = round(exited[0] - t0, 2) if exited else f">{BACKLOG_READ_S:g}"
            run.add(f"{name}: SIGTERM to exit (s)", took)
            run.add(f"{name}: exit code", srv.proc.returncode)


# ---------------------------------------------------------------- 4. slow consumers


def sockstat_tcp_mem_pages() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()
            return int(words[words.index("mem") + 1])
    return -1


def server_sockets(port: int) -> tuple[collections.Counter[str], int]:
    """States of the sockets whose local port is ``port``, and the bytes in
    the send queues of those in FIN-WAIT-1."""
    states: collections.Counter[str] = collections.Counter()
    fin_wait_queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    states[fields[3]] += 1
                    if fields[3] == TCP_FIN_WAIT1:
                        fin_wait_queued += int(fields[4].split(":")[0], 16)
    return states, fin_wait_queued


def slow_consumers(run: Run) -> None:
    mem0 = sockstat_tcp_mem_pages()
    with run.server("slow") as srv:
        socks = [open_stream(srv.port, "slow", UNREAD_RCVBUF)[0] for _ in range(SLOW_STREAMS)]
        try:
            first_cut = all_cut = 0
            sent = 0
            t0 = time.monotonic()
            with connect(srv.port) as pub:
                reader = Reader(pub)
                while sent < SLOW_MAX_MESSAGES and time.monotonic() - t0 < SLOW_MAX_S:
                    pub.sendall(publish_request("slow", PAYLOAD))
                    reader.response()
                    sent += 1
                    if sent % SLOW_CHECK_EVERY == 0:
                        cut = srv.metric("gochan_slow_consumer_disconnects_total")
                        if cut and not first_cut:
                            first_cut = sent
                        if cut >= SLOW_STREAMS:
                            all_cut = sent
                            break
            kib = len(PAYLOAD) / 1024
            run.add("messages of 1 KB published", sent)
            run.add("KiB published per stream at the first cut", round(first_cut * kib))
            run.add(
                "KiB published per stream when all were cut",
                round(all_cut * kib) if all_cut else f"not all cut ({sent} msgs)",
            )
            run.add(
                "slow consumer disconnects", srv.metric("gochan_slow_consumer_disconnects_total")
            )
            deadline = time.monotonic() + IO_TIMEOUT_S
            while srv.metric("gochan_streams") > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            states, queued = server_sockets(srv.port)
            states.pop(TCP_LISTEN, None)
            mem1 = sockstat_tcp_mem_pages()
            run.add("server sockets in FIN-WAIT-1", states.get(TCP_FIN_WAIT1, 0))
            run.add("their send queues (MiB)", round(queued / MIB, 1))
            run.add("server socket states", dict(states))
            run.add(
                "machine TCP mem before/after (MiB)",
                f"{mem0 * PAGE / MIB:.1f} / {mem1 * PAGE / MIB:.1f}",
            )
            data, ends = read_all(socks, SLOW_READ_S)
            run.add("clients reset / clean EOF / timeout", "{reset} / {EOF} / {timeout}".format(
                **{"reset": 0, "EOF": 0, "timeout": 0, **collections.Counter(ends)}))  # fmt: skip
            run.add("KiB read per client after the cut (mean)",
                    round(sum(map(len, data)) / len(data) / 1024))  # fmt: skip
        finally:
            for sock in socks:
                sock.close()


# ---------------------------------------------------------------- 5. lock-outs


def pending_answer(sock: socket.socket) -> str:
    """What a socket that sent nothing has been told so far."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return "idle"
    except ConnectionResetError:
        return "reset"
    if not data:
        return "EOF"
    return status(data)


async def _anonymous_connects(port: int, n: int, source: str) -> collections.Counter[str]:
    statuses: collections.Counter[str] = collections.Counter()
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0)
                )
            except OSError as exc:
                statuses[f"connect: {exc.strerror}"] += 1
                continue
            try:
                writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
                statuses[head.split()[1].decode()] += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
                statuses[type(exc).__name__] += 1
            finally:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(LOCKOUT_CONCURRENCY)))
    return statuses


def lockout(run: Run) -> None:
    healthz = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    with run.server("lockout-conns", "--max-connections", str(LOCKOUT_CONNECTIONS)) as srv:
        idle = [connect(srv.port) for _ in range(LOCKOUT_CONNECTIONS)]
        try:
            time.sleep(0.5)
            told = collections.Counter(pending_answer(sock) for sock in idle)
            run.add(f"(a) {LOCKOUT_CONNECTIONS} idle sockets from 127.0.0.1 were told", dict(told))
            with connect(srv.port) as sock:
                run.add("(a) 301st from 127.0.0.1: GET /healthz got", outcome(sock, healthz))
            with connect(srv.port, OTHER_PEER) as sock:
                run.add(f"(a) {OTHER_PEER}: GET /healthz got", outcome(sock, healthz))
        finally:
            for sock in idle:
                sock.close()
    with run.server("lockout-clients", "--max-clients", str(LOCKOUT_CLIENTS)) as srv:
        t0 = time.monotonic()
        statuses = uvloop.run(_anonymous_connects(srv.port, LOCKOUT_CLIENTS, "127.0.0.1"))
        took = time.monotonic() - t0
        run.add(f"(b) {LOCKOUT_CLIENTS} anonymous GET /events from 127.0.0.1 got", dict(statuses))
        run.add("(b) in (s)", round(took, 2))
        run.add("(b) gochan_clients then", srv.metric("gochan_clients"))
        other = uvloop.run(_anonymous_connects(srv.port, 1, OTHER_PEER))
        run.add(f"(b) {OTHER_PEER}: GET /events got", ", ".join(other))


# ---------------------------------------------------------------- 6. cross-site


def cross_site(run: Run) -> None:
    plain = "Content-Type: text/plain\r\n"
    evil = "Origin: https://evil.example\r\n"
    with run.server("cross-site") as srv:
        run.add("plain keyless publish (control)", http(srv.port, publish_request("x", b"hi"))[0])
        req = publish_request("x", b"hi", plain + evil)
        run.add("publish, Origin: https://evil.example, text/plain", http(srv.port, req)[0])
        req = publish_request("x", b"hi", plain, host="attacker.example")
        run.add("publish, Host: attacker.example", http(srv.port, req)[0])
        sock, _, client_id = open_stream(srv.port, "x")
        with sock:
            body = json.dumps({"client_id": client_id, "add": ["y"]}).encode()
            req = (
                f"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n{plain}{evil}"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            run.add("update_subscriptions, Origin: https://evil.example", http(srv.port, req)[0])


# ---------------------------------------------------------------- 7. small ones


def small(run: Run) -> None:
    with tempfile.TemporaryDirectory() as static:
        (Path(static) / "index.html").write_text("hi\n")
        with run.server("small-static", "--static-dir", static) as srv:
            answer = raw(
                srv.port, b"GET /%00 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            run.add("GET /%00 with --static-dir", status(answer))
            time.sleep(0.2)
            run.add("Traceback in the server's output", "Traceback" in srv.output())
            for escape in ("%FF", "%FE"):
                run.add(
                    f"publish ?topic={escape}", http(srv.port, publish_request(escape, b"x"))[0]
                )
    with run.server("small-key", "--publish-key", "clé") as srv:
        key = "Authorization: Bearer clé\r\n"
        req = publish_request("a", b"x").replace(b"\r\n\r\n", f"\r\n{key}\r\n".encode(), 1)
        run.add("publish with key 'clé' sent as UTF-8", http(srv.port, req)[0])


# ---------------------------------------------------------------- 8. Expect: 100-continue


STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3})")


def expect_continue(run: Run) -> None:
    expect = (
        b"POST /publish?topic=a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    with run.server("expect") as srv, connect(srv.port, timeout=1.0) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" + expect)
        data = b""
        with contextlib.suppress(TimeoutError):
            while len(STATUS_LINE.findall(data)) < 2 and (chunk := sock.recv(65536)):
                data += chunk
        first = [s.decode() for s in STATUS_LINE.findall(data)]
        run.add("pipelined healthz + Expect POST: first two status lines", ", ".join(first[:2]))
        sock.sendall(b"hi")
        with contextlib.suppress(TimeoutError):
            while len(STATUS_LINE.findall(data)) < 3 and (chunk := sock.recv(65536)):
                data += chunk
        rest = [s.decode() for s in STATUS_LINE.findall(data)[2:]]
        run.add("then, the body sent: the POST got", ", ".join(rest) or "nothing")
    with run.server("expect-key", "--publish-key", "k") as srv:
        answer = raw(srv.port, expect, timeout=2.0)
        lines = [s.decode() for s in STATUS_LINE.findall(answer)]
        run.add("--publish-key k, no Authorization: status lines", ", ".join(lines))
        run.add("100 Continue before the 401", "100" in lines)


# ---------------------------------------------------------------- main


ITEMS: dict[str, Callable[[Run], None]] = {
    "unread_pipeline": unread_pipeline,
    "update_stall": update_stall,
    "sigterm_backlog": sigterm_backlog,
    "slow_consumers": slow_consumers,
    "lockout": lockout,
    "cross_site": cross_site,
    "small": small,
    "expect_continue": expect_continue,
}


def fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:,.2f}".rstrip("0").rstrip(".") if value == value else "nan"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def report(result: Json) -> str:
    rows = [
        [item, figure, fmt(value)]
        for item, figures in result["items"].items()
        for figure, value in figures.items()
    ]
    return table(["item", "figure", "value"], rows)


def compare(paths: list[str]) -> str:
    results = [json.loads(Path(p).read_text()) for p in paths]
    names = [f"{r['rev'] or 'tree'} ({r['sha'][:7]})" for r in results]
    keys: dict[tuple[str, str], None] = {}
    for r in results:
        for item, figures in r["items"].items():
            for figure in figures:
                keys[item, figure] = None
    rows = [
        [item, figure, *(fmt(r["items"].get(item, {}).get(figure, "")) for r in results)]
        for item, figure in keys
    ]
    return table(["item", "figure", *names], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(ITEMS), help="item (repeatable)")
    p.add_argument(
        "--rev",
        help="run the servers from this commit (exported and built under bench/results/) "
        "instead of the working tree",
    )
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument(
        "--compare", nargs="+", metavar="JSON", help="print earlier --json files side by side"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return 0
    tree = _server.source_tree(args.rev, log)
    sha = subprocess.run(
        ["git", "-C", str(_server.ROOT), "rev-parse", args.rev or "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    logs = RESULTS / f"attacks-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True, exist_ok=True)
    log(f"servers from {tree} ({args.rev or 'working tree'}, {sha[:12]}), logs in {logs}")
    run = Run(tree, logs)
    t_start = time.monotonic()
    durations = {}
    failed = []
    for name in args.only or ITEMS:
        run.item = name
        t0 = time.monotonic()
        try:
            ITEMS[name](run)
        except Exception as exc:  # one item failing does not stop the others
            run.add("error", f"{type(exc).__name__}: {exc}")
            failed.append(name)
        durations[name] = round(time.monotonic() - t0, 1)
        log(f"{name}: {durations[name]} s")
    result = {
        "rev": args.rev,
        "sha": sha,
        "tree": str(tree),
        "logs": str(logs),
        "elapsed_s": round(time.monotonic() - t_start, 1),
        "durations_s": durations,
        "items": run.figures,
    }
    print(report(result), flush=True)
    print(f"\n{result['elapsed_s']} s; server logs in {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
