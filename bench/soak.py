"""Soak benchmark: a million short-lived SSE clients against one gochan server.

Starts ``python -m gochan.server`` on a free loopback port with a short client
TTL (clients expire during the run) and a short history age (the replay ring
empties once publishing stops), runs a warm-up, waits for the server to go idle
and records the baseline: VmRSS, open descriptors and every gauge of /metrics.
Then it runs N connect/subscribe/disconnect cycles from concurrent asyncio
workers (uvloop) while a publisher posts to a rotating set of topics at a fixed
rate. Each cycle opens a raw TCP connection and sends ``GET /events`` with one
to three random topics; some re-attach to the id of an earlier cycle's client
(some with a Last-Event-ID, so the server replays), some also change their
subscriptions with ``POST /update_subscriptions``, some wait for a published
message; then the connection closes, with an RST (SO_LINGER 0) or a FIN, and
a few close right after sending the request, before any answer.

At the end it waits for the TTL and the history age to pass and the gauges to
settle, prints baseline against end, and exits 1 if the descriptors or any gauge
did not come back to the baseline, RSS grew past the bound, or a cycle failed.

Everything stays on 127.0.0.0/8; every wait is bounded and the run stops by
itself. Source addresses rotate over 127.0.0.2 .. so that connections closed
with a FIN, which leave TIME_WAIT on this side, do not run out of ephemeral ports.

Usage:
    python bench/soak.py --cycles 20000     # about 30 s
    python bench/soak.py --rev HEAD         # 1,000,000 cycles, the server from HEAD
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import _server
import uvloop
from _server import RESULTS, cpu_s, fd_count, free_port, rss_kib, stop_process

DEFAULT_CYCLES = 1_000_000
DEFAULT_WARMUP_CYCLES = 20_000
DEFAULT_CONCURRENCY = 200  # cycles in flight; each holds at most 2 descriptors
DEFAULT_TOPICS = 50
DEFAULT_PUBLISH_RATE = 500.0  # msgs/s over all topics: 10/s per topic by default
DEFAULT_CLIENT_TTL_S = 2.0
DEFAULT_HISTORY_AGE_S = 3.0
DEFAULT_SOURCE_ADDRS = 16  # 127.0.0.2 .. 127.0.0.17
DEFAULT_PROGRESS_S = 10.0
DEFAULT_TIME_LIMIT_S = 3 * 3600.0
# RSS bound: end <= baseline * (1 + share) + slack. The baseline is taken after a
# warm-up at full concurrency, so the pools that only grow (pymalloc arenas, the
# free lists, dicts and sets sized for the peak number of live clients and
# connections, uvloop's buffers) are already at their peak; what remains is
# allocator fragmentation, which moves with the live set, not with the number of
# cycles. Anything kept per cycle grows with N instead: at 1,000,000 cycles this
# bound (about 14 MiB over a 30 MiB baseline) catches about 15 bytes per cycle.
DEFAULT_RSS_GROWTH_SHARE = 0.20
DEFAULT_RSS_SLACK_MIB = 8.0

# The cycle mix (probabilities per cycle).
P_MULTI_TOPIC = 0.3  # 2 or 3 topics instead of 1
P_REATTACH = 0.2  # ?id= of an earlier cycle's client
P_LAST_EVENT_ID = 0.5  # of re-attaching cycles: also send Last-Event-ID
P_UPDATE = 0.15  # of fresh clients: POST /update_subscriptions add one, remove one
P_WAIT_MESSAGE = 0.1  # wait for a published message before closing
P_EARLY_CLOSE = 0.03  # close (RST) right after sending the request
P_RST = 0.5  # close with an RST; otherwise a FIN

IO_TIMEOUT_S = 10.0  # one cycle, all included
MESSAGE_WAIT_S = 5.0  # a topic gets publish_rate / topics msgs/s: 10/s by default
RECENT_IDS = 1000  # client ids re-attaching cycles pick from
PUBLISH_TICK_S = 0.005
PUBLISH_MAX_LAG_S = 0.5  # never more than this much behind schedule; the rest is skipped
SETTLE_EXTRA_S = 30.0  # beyond TTL + history age, the most to wait for the gauges
SETTLE_POLL_S = 0.5
ERROR_SAMPLES = 10

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
LINGER_RST = struct.pack("ii", 1, 0)

Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the server process


# One address opens every connection, as fast as it can: the connection rate
# limit (builds that have it) would answer most of them 429.
NO_RATE_LIMIT = ["--connection-rate-per-peer", "0"]


def server_command(args: argparse.Namespace, port: int, tree: Path | None = None) -> list[str]:
    flags = ["--log-level", "warning", "--client-ttl", str(args.client_ttl)]
    if tree is not None and _server.accepts_flags(tree, NO_RATE_LIMIT):
        flags += NO_RATE_LIMIT
    return _server.server_command(
        port, [*flags, "--history-age", str(args.history_age), *args.server_arg]
    )


def time_wait_sockets() -> int:
    """Sockets in TIME_WAIT on the machine (/proc/net/sockstat), -1 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    return -1


# ---------------------------------------------------------------- HTTP bits


class CycleError(Exception):
    """A cycle went wrong on the server's side (or the run's): counted by reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


async def open_conn(
    host: str, port: int, source: str, rst: bool
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from ``source``; ``rst``: closing it sends an RST."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # Pick the port at connect(), unique per 4-tuple, not at bind() against
        # every socket on the address.
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
        return await asyncio.open_connection(sock=sock)
    except OSError as exc:
        sock.close()
        raise CycleError("connect", f"{source}: {exc}") from None
    except BaseException:
        sock.close()
        raise


async def close_conn(writer: asyncio.StreamWriter, rst: bool) -> None:
    if rst:
        writer.transport.abort()  # SO_LINGER 0: the close sends an RST
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Status and body of a response with a Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, body


def parse_frame(frame: bytes) -> tuple[str, str, bytes]:
    """(event, id, data) of one SSE frame (ends in a blank line)."""
    event, event_id, data = "message", "", []
    for line in frame.split(b"\n"):
        name, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if name == b"event":
            event = value.decode()
        elif name == b"id":
            event_id = value.decode()
        elif name == b"data":
            data.append(value)
    return event, event_id, b"\n".join(data)


async def get_metrics(host: str, port: int) -> tuple[dict[str, float], dict[str, float]]:
    """gochan's gauges and counters of /metrics, by name (over one connection,
    closed with an RST); the process's own (memory, CPU) are not compared."""
    reader, writer = await open_conn(host, port, "127.0.0.1", rst=True)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, body = await asyncio.wait_for(read_response(reader), IO_TIMEOUT_S)
    finally:
        await close_conn(writer, rst=True)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    kinds: dict[str, str] = {}
    values: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
        elif line.startswith("gochan_"):
            name, value = line.split()
            values[name] = float(value)
    gauges = {n: v for n, v in sorted(values.items()) if kinds.get(n) == "gauge"}
    counters = {n: v for n, v in sorted(values.items()) if kinds.get(n) == "counter"}
    return gauges, counters


# ---------------------------------------------------------------- the load


@dataclass
class Stats:
    cycles: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    fresh: int = 0
    multi_topic: int = 0
    reattached: int = 0
    reattach_expired: int = 0  # the earlier client had expired: 401, as it should
    last_event_id_sent: int = 0
    updates: int = 0
    waited: int = 0
    early_closes: int = 0
    rst_closes: int = 0
    fin_closes: int = 0
    received: int = 0  # topic frames read by the cycles (live and replayed)
    published: int = 0
    publish_errors: int = 0
    publish_skipped: int = 0

    def error(self, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, CycleError) else type(exc).__name__
        self.errors += 1
        self.error_reasons[reason] = self.error_reasons.get(reason, 0) + 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(f"{reason}: {exc}")


class Load:
    """The cycle workers and the publisher, on one event loop."""

    def __init__(self, args: argparse.Namespace, port: int, rng: random.Random) -> None:
        self.args = args
        self.host = "127.0.0.1"
        self.port = port
        self.rng = rng
        self.topics = [f"soak{i}" for i in range(args.topics)]
        self.sources = [f"127.0.0.{2 + i}" for i in range(args.source_addrs)] or ["127.0.0.1"]
        self.recent: collections.deque[str] = collections.deque(maxlen=RECENT_IDS)
        self.last_event_id = ""
        self.stats = Stats()
        self.next_cycle = 0
        self.target = 0
        self.deadline = float("inf")
        self.rss_samples: list[tuple[int, int]] = []  # (cycles, VmRSS KiB) per progress line

    # -- cycles ------------------------------------------------------------

    async def run_cycles(self, n: int, deadline: float) -> None:
        self.next_cycle, self.target, self.deadline = 0, n, deadline
        workers = min(self.args.concurrency, n)
        await asyncio.gather(*(self.worker() for _ in range(workers)))

    async def worker(self) -> None:
        while self.next_cycle < self.target and time.monotonic() < self.deadline:
            i = self.next_cycle
            self.next_cycle += 1
            try:
                await asyncio.wait_for(self.cycle(i), IO_TIMEOUT_S)
            except (CycleError, asyncio.TimeoutError, OSError, ValueError) as exc:
                self.stats.error(exc)
            except asyncio.IncompleteReadError as exc:
                self.stats.error(CycleError("eof", f"after {len(exc.partial)} bytes"))
            self.stats.cycles += 1

    async def cycle(self, i: int) -> None:
        rng, st = self.rng, self.stats
        source = self.sources[i % len(self.sources)]
        rst = rng.random() < P_RST
        early = rng.random() < P_EARLY_CLOSE
        topics = rng.sample(self.topics, rng.choice((2, 3)) if rng.random() < P_MULTI_TOPIC else 1)
        st.multi_topic += len(topics) > 1
        client_id = rng.choice(self.recent) if self.recent and rng.random() < P_REATTACH else ""
        query = "&".join(f"topic={t}" for t in topics)
        headers = ""
        if client_id:
            query += f"&id={client_id}"
            if self.last_event_id and rng.random() < P_LAST_EVENT_ID:
                headers = f"Last-Event-ID: {self.last_event_id}\r\n"
                st.last_event_id_sent += 1
        reader, writer = await open_conn(self.host, self.port, source, rst or early)
        try:
            request = f"GET /events?{query} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n"
            writer.write(request.encode())
            if early:
                st.early_closes += 1
                return
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            if status == 401 and client_id:
                st.reattach_expired += 1
                return
            if status != 200:
                raise CycleError(f"events {status}", head.split(b"\r\n", 1)[0].decode())
            event, _, data = parse_frame(await reader.readuntil(b"\n\n"))
            if event != "message":
                raise CycleError("first frame", f"event {event!r}")
            first = json.loads(data)
            new_id = first["config"]["client_id"]
            subscribed = set(first["subscriptions"])
            if client_id:
                st.reattached += 1
                if new_id != client_id:
                    raise CycleError("reattach", f"asked for {client_id}, got {new_id}")
            else:
                st.fresh += 1
            if not subscribed.issuperset(topics):
                raise CycleError("first frame", f"subscriptions {sorted(subscribed)} for {topics}")
            if not client_id and rng.random() < P_UPDATE:
                # Only on a fresh client: no other cycle knows its id yet, so
                # nothing else changes its topics meanwhile.
                await self.update(new_id, source, rst, topics, subscribed)
            if rng.random() < P_WAIT_MESSAGE:
                st.waited += 1
                await self.wait_message(reader)
            self.recent.append(new_id)
        finally:
            if rst or early:
                st.rst_closes += 1
            else:
                st.fin_closes += 1
            await close_conn(writer, rst or early)

    async def update(
        self, client_id: str, source: str, rst: bool, topics: list[str], subscribed: set[str]
    ) -> None:
        add = self.rng.choice([t for t in self.topics if t not in subscribed])
        remove = topics[0]
        body = json.dumps({"client_id": client_id, "add": [add], "remove": [remove]}).encode()
        reader, writer = await open_conn(self.host, self.port, source, rst)
        try:
            writer.write(
                b"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            status, answer = await read_response(reader)
        finally:
            await close_conn(writer, rst)
        if status != 200:
            raise CycleError(f"update {status}", answer.decode(errors="replace").strip())
        now = set(json.loads(answer)["subscriptions"])
        if add not in now or remove in now:
            raise CycleError("update", f"+{add} -{remove} gave {sorted(now)}")
        self.stats.updates += 1

    async def wait_message(self, reader: asyncio.StreamReader) -> None:
        """Read frames until one on a topic arrives (within MESSAGE_WAIT_S)."""

        async def until_message() -> None:
            while True:
                event, _, _ = parse_frame(await reader.readuntil(b"\n\n"))
                if event != "message":
                    self.stats.received += 1
                    return

        try:
            await asyncio.wait_for(until_message(), MESSAGE_WAIT_S)
        except asyncio.TimeoutError:
            raise CycleError("no message", f"within {MESSAGE_WAIT_S:g} s") from None

    # -- publisher ---------------------------------------------------------

    async def publish(self, stop: asyncio.Event) -> None:
        """POST /publish round-robin over the topics at a fixed rate, pipelined
        on one keep-alive connection; behind schedule by more than
        PUBLISH_MAX_LAG_S, the excess is skipped and counted."""
        rate, st = self.args.publish_rate, self.stats
        if rate <= 0:
            return
        reader, writer = await open_conn(self.host, self.port, "127.0.0.1", rst=False)
        t0, scheduled, seq = time.monotonic(), 0, 0
        try:
            while not stop.is_set():
                due = int((time.monotonic() - t0) * rate) - scheduled
                lag = due - int(rate * PUBLISH_MAX_LAG_S)
                if lag > 0:
                    st.publish_skipped += lag
                    scheduled += lag
                    due -= lag
                if due > 0:
                    batch = []
                    for _ in range(due):
                        topic = self.topics[seq % len(self.topics)]
                        body = b"soak %d" % seq
                        batch.append(
                            b"POST /publish?topic=%s HTTP/1.1\r\nHost: localhost\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (topic.encode(), len(body), body)
                        )
                        seq += 1
                    writer.write(b"".join(batch))
                    scheduled += due
                    for _ in range(due):
                        status, answer = await asyncio.wait_for(read_response(reader), IO_TIMEOUT_S)
                        if status == 200:
                            st.published += 1
                            self.last_event_id = json.loads(answer)["id"]
                        else:
                            st.publish_errors += 1
                await asyncio.sleep(PUBLISH_TICK_S)
        finally:
            await close_conn(writer, rst=False)


# ---------------------------------------------------------------- phases


@dataclass
class Snapshot:
    rss_kib: int
    fds: int
    gauges: dict[str, float]


async def snapshot(pid: int, port: int) -> Snapshot:
    gauges, _ = await get_metrics("127.0.0.1", port)
    return Snapshot(rss_kib(pid), fd_count(pid), gauges)


async def settle(
    pid: int, port: int, args: argparse.Namespace, want: Snapshot | None
) -> tuple[Snapshot, float]:
    """Wait for the TTL and the history age to pass, then until the descriptors
    and gauges equal ``want`` (or, with none, stop changing), at most
    SETTLE_EXTRA_S more. Returns the last snapshot and the seconds waited."""
    t0 = time.monotonic()
    await asyncio.sleep(max(args.client_ttl, args.history_age) + 1.0)
    deadline = time.monotonic() + SETTLE_EXTRA_S
    prev = await snapshot(pid, port)
    while time.monotonic() < deadline:
        await asyncio.sleep(SETTLE_POLL_S)
        snap = await snapshot(pid, port)
        key = (snap.fds, snap.gauges)
        if (want is None and key == (prev.fds, prev.gauges)) or (
            want is not None and key == (want.fds, want.gauges)
        ):
            return snap, time.monotonic() - t0
        prev = snap
    return prev, time.monotonic() - t0


async def progress(
    load: Load, proc: subprocess.Popen[Any], port: int, every_s: float, stop: asyncio.Event
) -> None:
    st, pid = load.stats, proc.pid
    last_t, last_n = time.monotonic(), 0
    t_start = last_t
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        now = time.monotonic()
        if proc.poll() is not None:
            log(f"server exited with code {proc.returncode}: stopping")
            load.deadline = 0.0
            return
        try:
            gauges, _ = await get_metrics("127.0.0.1", port)
        except (CycleError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
            gauges = {}
            log(f"metrics: {exc}")
        rate = (st.cycles - last_n) / (now - last_t) if now > last_t else 0.0
        log(
            f"{st.cycles:>9,} cycles {now - t_start:6.0f} s {rate:7,.0f}/s "
            f"rss {rss_kib(pid) / 1024:6.1f} MiB fds {fd_count(pid):5} "
            f"streams {gauges.get('gochan_streams', -1):5.0f} "
            f"clients {gauges.get('gochan_clients', -1):6.0f} "
            f"errors {st.errors} published {st.published} received {st.received} "
            f"tw {time_wait_sockets()}"
        )
        load.rss_samples.append((st.cycles, rss_kib(pid)))
        last_t, last_n = now, st.cycles


async def soak(args: argparse.Namespace, proc: subprocess.Popen[Any], port: int) -> Json:
    pid = proc.pid
    rng = random.Random(args.seed)
    load = Load(args, port, rng)

    async def phase(n: int, time_limit: float) -> float:
        stop = asyncio.Event()
        pub = asyncio.create_task(load.publish(stop))
        prog = asyncio.create_task(progress(load, proc, port, args.progress, stop))
        t0 = time.monotonic()
        try:
            await load.run_cycles(n, t0 + time_limit)
        finally:
            elapsed = time.monotonic() - t0
            stop.set()
            await asyncio.gather(pub, prog)
        return elapsed

    start_rss = rss_kib(pid)
    if args.warmup_cycles:
        log(f"warm-up: {args.warmup_cycles:,} cycles")
        await phase(args.warmup_cycles, args.time_limit)
        if load.stats.errors:
            log(f"warm-up errors: {load.stats.error_reasons} {load.stats.error_samples[:3]}")
    baseline, waited = await settle(pid, port, args, None)
    log(
        f"baseline after {waited:.1f} s: rss {baseline.rss_kib / 1024:.1f} MiB "
        f"(at start {start_rss / 1024:.1f}) fds {baseline.fds} {baseline.gauges}"
    )
    warmup_stats = load.stats
    load.stats = Stats()
    load.rss_samples = []
    _, counters0 = await get_metrics("127.0.0.1", port)
    cpu0 = cpu_s(pid)
    log(
        f"run: {args.cycles:,} cycles, {args.concurrency} in flight, "
        f"publishing {args.publish_rate:g}/s on {args.topics} topics"
    )
    elapsed = await phase(args.cycles, args.time_limit)
    under_load_rss = rss_kib(pid)
    cpu = cpu_s(pid) - cpu0
    end, settle_s = await settle(pid, port, args, baseline)
    _, counters1 = await get_metrics("127.0.0.1", port)
    st = load.stats
    limit_kib = int(baseline.rss_kib * (1 + args.rss_growth_share) + args.rss_slack_mib * 1024)
    checks = {
        "rss": end.rss_kib <= limit_kib,
        "fds": end.fds == baseline.fds,
        **{g: end.gauges.get(g) == v for g, v in baseline.gauges.items()},
        "errors": st.errors <= args.max_errors,
        "cycles": st.cycles == args.cycles,
    }
    for g in end.gauges.keys() - baseline.gauges.keys():
        checks[g] = False
    samples = load.rss_samples
    return {
        "args": vars(args),
        "port": port,
        "server_command": proc.args,
        "elapsed_s": elapsed,
        "cycles_per_s": st.cycles / elapsed if elapsed else 0.0,
        "server_cpu_s": cpu,
        "settle_s": settle_s,
        "rss_start_kib": start_rss,
        "rss_limit_kib": limit_kib,
        "rss_under_load_kib": under_load_rss,
        "rss_samples": samples,
        "baseline": asdict(baseline),
        "end": asdict(end),
        "counters": {k: counters1.get(k, 0) - v for k, v in counters0.items()},
        "stats": asdict(st),
        "warmup_stats": asdict(warmup_stats),
        "checks": checks,
        "ok": all(checks.values()),
    }


# ---------------------------------------------------------------- report


def report(r: Json) -> str:
    b, e, checks = r["baseline"], r["end"], r["checks"]
    rows = [("metric", "baseline", "end", "delta", "bound", "ok")]

    def row(name: str, base: float, end: float | None, bound: str, ok: bool) -> None:
        end_s = "missing" if end is None else f"{end:,.0f}"
        delta = "" if end is None else f"{end - base:+,.0f}"
        rows.append((name, f"{base:,.0f}", end_s, delta, bound, "yes" if ok else "NO"))

    row("RSS (KiB)", b["rss_kib"], e["rss_kib"], f"<= {r['rss_limit_kib']:,}", checks["rss"])
    row("open fds", b["fds"], e["fds"], "== baseline", checks["fds"])
    for g in sorted(b["gauges"].keys() | e["gauges"].keys()):
        row(g, b["gauges"].get(g, 0), e["gauges"].get(g), "== baseline", checks[g])
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(x, widths, strict=True))
        )
        for x in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    st, c = r["stats"], r["counters"]
    samples = r["rss_samples"]
    mid = next((kib for n, kib in samples if n >= st["cycles"] // 2), None)
    run = [
        ("cycles run", f"{st['cycles']:,}"),
        ("elapsed (s)", f"{r['elapsed_s']:,.1f}"),
        ("cycles/s", f"{r['cycles_per_s']:,.0f}"),
        ("server CPU (s)", f"{r['server_cpu_s']:,.1f}"),
        ("errors", f"{st['errors']:,} {st['error_reasons'] or ''}".strip()),
        ("fresh / re-attached / re-attach expired", f"{st['fresh']:,} / {st['reattached']:,} / "
         f"{st['reattach_expired']:,}"),
        ("with Last-Event-ID / multi-topic / updates", f"{st['last_event_id_sent']:,} / "
         f"{st['multi_topic']:,} / {st['updates']:,}"),
        ("closes RST / FIN / early (RST before the answer)",
         f"{st['rst_closes']:,} / {st['fin_closes']:,} / {st['early_closes']:,}"),
        ("published (200) / errors / skipped", f"{st['published']:,} / "
         f"{st['publish_errors']:,} / {st['publish_skipped']:,}"),
        ("waited for a message / received", f"{st['waited']:,} / {st['received']:,}"),
        ("server: published / deliveries / expired clients",
         f"{c.get('gochan_messages_published_total', 0):,.0f} / "
         f"{c.get('gochan_deliveries_total', 0):,.0f} / "
         f"{c.get('gochan_clients_expired_total', 0):,.0f}"),
        ("server: connections accepted / refused / bad requests",
         f"{c.get('gochan_connections_accepted_total', 0):,.0f} / "
         f"{c.get('gochan_connections_refused_total', 0):,.0f} / "
         f"{c.get('gochan_bad_requests_total', 0):,.0f}"),
        ("server: replay hits / misses / slow disconnects",
         f"{c.get('gochan_replay_hits_total', 0):,.0f} / "
         f"{c.get('gochan_replay_misses_total', 0):,.0f} / "
         f"{c.get('gochan_slow_consumer_disconnects_total', 0):,.0f}"),
        ("RSS under load at 50% / 100% of cycles (KiB)",
         f"{mid or 0:,} / {r['rss_under_load_kib']:,}"),
        ("settled after (s)", f"{r['settle_s']:.1f}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in run)
    lines.append("")
    lines += [f"{k.ljust(width)}  {v}" for k, v in run]
    if st["error_samples"]:
        lines.append("error samples:")
        lines += [f"  {s}" for s in st["error_samples"]]
    lines.append("")
    lines.append("PASS" if r["ok"] else "FAIL: " + ", ".join(k for k, v in checks.items() if not v))
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=DEFAULT_CYCLES)
    p.add_argument("--warmup-cycles", type=int, default=DEFAULT_WARMUP_CYCLES)
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--topics", type=int, default=DEFAULT_TOPICS, help="topics K")
    p.add_argument("--publish-rate", type=float, default=DEFAULT_PUBLISH_RATE, help="msgs/s")
    p.add_argument("--client-ttl", type=float, default=DEFAULT_CLIENT_TTL_S, help="s")
    p.add_argument("--history-age", type=float, default=DEFAULT_HISTORY_AGE_S, help="s")
    p.add_argument("--source-addrs", type=int, default=DEFAULT_SOURCE_ADDRS)
    p.add_argument("--progress", type=float, default=DEFAULT_PROGRESS_S, help="s between lines")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="s per phase")
    p.add_argument("--rss-growth-share", type=float, default=DEFAULT_RSS_GROWTH_SHARE)
    p.add_argument("--rss-slack-mib", type=float, default=DEFAULT_RSS_SLACK_MIB)
    p.add_argument("--max-errors", type=int, default=0, help="cycle errors tolerated")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag")
    p.add_argument(
        "--rev",
        help="run the server from this commit (exported and built under bench/results/) "
        "instead of the working tree",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if not 0 <= args.source_addrs <= 250:
        p.error("--source-addrs: 0 to 250")
    if args.topics < 4:
        p.error("--topics: at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    port = free_port()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tree = _server.source_tree(args.rev, log)
    log_path = RESULTS / f"soak-server-{time.strftime('%Y%m%d-%H%M%S')}.log"
    cmd = server_command(args, port, tree)
    log(f"server: {' '.join(cmd)} in {tree} (output to {log_path})")
    with open(log_path, "w") as server_log:
        try:
            proc = _server.start_server(cmd, tree, port, server_log)
        except RuntimeError as exc:
            log(f"{exc}; see {log_path}")
            return 2
    try:
        result = uvloop.run(soak(args, proc, port))
        result["server_tree"] = str(tree)
        if proc.poll() is not None:
            log(f"server exited with code {proc.returncode} during the run")
            result["ok"] = False
            result["checks"]["server alive"] = False
    finally:
        stop_process(proc)
    text = report(result)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
