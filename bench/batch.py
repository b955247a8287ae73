"""Server CPU per message: single publishes against batches (NDJSON POST /publish).

One ``python -m gochan.server`` per run (in-memory bus, or ``--driver nats`` on
a running nats-server), S streams each subscribed to one of S topics, and a
publisher sending M messages round-robin over the topics through keep-alive
connections with W requests in flight each: ``POST /publish?topic=TopicN``
one message at a time, or NDJSON bodies of B messages. The figure is the
server's CPU seconds (``/proc/PID/stat`` utime + stime) from the first
publish until every stream has received every message, divided by M. The
publisher and the streams run in this process; its CPU is not counted.

Runs alternate (single, batch, single, batch, ...) so both modes see the same
machine; each figure is the median of its runs.

Usage:
    python bench/batch.py                               # in-memory, batches of 100
    python bench/batch.py --driver nats                 # core NATS at 127.0.0.1:4222
    python bench/batch.py --messages 100000 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _server  # bench/ is not a package: found through sys.path

PAYLOAD_BYTES = 64
DELIVERY_TIMEOUT_S = 120.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--driver", default="mem", choices=("mem", "nats"))
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--messages", type=int, default=50_000, help="messages per run (M)")
    p.add_argument("--batch", type=int, default=100, help="messages per batch (B)")
    p.add_argument("--streams", type=int, default=100, help="streams, one topic each (S)")
    p.add_argument("--connections", type=int, default=4, help="publisher connections")
    p.add_argument("--window", type=int, default=16, help="requests in flight per connection (W)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternated")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p.parse_args(argv)


class Stream(asyncio.Protocol):
    """One /events stream that counts the frames it receives."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter
        self.last = b""
        self.head_done = False
        self.buffer = b""
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        if not self.head_done:  # the head, then the first frame (the client's config)
            self.buffer += data
            end = self.buffer.find(b"\n\n", self.buffer.find(b"\r\n\r\n") + 4)
            if end < 0:
                return
            self.head_done = True
            data, self.buffer = self.buffer[end + 2 :], b""
            self.ready.set_result(None)
        # Frames end with a blank line; one may straddle two reads.
        self.counter[0] += (self.last + data).count(b"\n\n") - self.last.count(b"\n\n")
        self.last = data[-1:]


class Publisher(asyncio.Protocol):
    """A keep-alive connection that counts the answers it gets (2xx only)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.answered = 0
        self.failed: list[bytes] = []
        self.wakeup = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 202")):
                self.failed.append(self.buffer[: end + 4 + length])
            self.buffer = self.buffer[end + 4 + length :]
            self.answered += 1
            self.wakeup.set()


def requests(args: argparse.Namespace, batched: bool) -> list[bytes]:
    """The requests carrying the M messages, round-robin over the topics."""
    payload = "x" * PAYLOAD_BYTES
    topics = [f"Topic{n % args.streams}" for n in range(args.messages)]
    if not batched:
        head = "POST /publish?topic={} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n"
        return [head.format(t, PAYLOAD_BYTES).encode() + payload.encode() for t in topics]
    out = []
    for start in range(0, len(topics), args.batch):
        body = b"".join(
            json.dumps({"topic": t, "data": payload}).encode() + b"\n"
            for t in topics[start : start + args.batch]
        )
        out.append(
            b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-ndjson\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
    return out


async def drive(conn: Publisher, todo: list[bytes], window: int) -> None:
    assert conn.transport is not None
    sent = 0
    while sent < len(todo) or conn.answered < sent:
        while sent < len(todo) and sent - conn.answered < window:
            conn.transport.write(todo[sent])
            sent += 1
        conn.wakeup.clear()
        if conn.answered < sent:
            await conn.wakeup.wait()


async def run_once(args: argparse.Namespace, batched: bool, port: int, pid: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    counter = [0]
    streams = []
    for n in range(args.streams):
        _, stream = await loop.create_connection(lambda: Stream(counter), "127.0.0.1", port)
        assert stream.transport is not None
        stream.transport.write(
            f"GET /events?topic=Topic{n} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        streams.append(stream)
    await asyncio.gather(*(s.ready for s in streams))
    conns = []
    for _ in range(args.connections):
        _, conn = await loop.create_connection(Publisher, "127.0.0.1", port)
        conns.append(conn)
    todo = requests(args, batched)
    shares = [todo[i :: args.connections] for i in range(args.connections)]
    window = args.window
    cpu0, wall0 = _server.cpu_s(pid), time.perf_counter()
    await asyncio.gather(*(drive(c, share, window) for c, share in zip(conns, shares, strict=True)))
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while counter[0] < args.messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {counter[0]} of {args.messages} messages delivered")
        await asyncio.sleep(0.002)
    cpu1, wall1 = _server.cpu_s(pid), time.perf_counter()
    failed = [f for c in conns for f in c.failed]
    if failed:
        raise RuntimeError(f"{len(failed)} publishes refused, the first: {failed[0][:200]!r}")
    for item in (*streams, *conns):
        assert item.transport is not None
        item.transport.close()
    return {
        "mode": f"batch of {args.batch}" if batched else "single",
        "cpu_us_per_message": round((cpu1 - cpu0) / args.messages * 1e6, 2),
        "messages_per_s": round(args.messages / (wall1 - wall0)),
        "requests": len(todo),
    }


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--log-level", "warning", f"--max-batch-messages={max(args.batch, 1)}"]
    if args.driver == "nats":
        prefix = f"bench{secrets.token_hex(3)}."  # out of the way of others on that server
        flags += ["--driver", "nats", f"--nats-url={args.nats_url}", f"--nats-prefix={prefix}"]
    return flags


async def measure(args: argparse.Namespace, batched: bool) -> dict[str, Any]:
    port = _server.free_port()
    cmd = _server.server_command(port, server_flags(args))
    with tempfile.TemporaryFile() as log:
        proc = _server.start_server(cmd, _server.ROOT, port, log)
        try:
            return await run_once(args, batched, port, proc.pid)
        except BaseException:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            _server.stop_process(proc)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for batched in (False, True):
            result = await measure(args, batched)
            runs[batched].append(result)
            if not args.json:
                print(json.dumps(result), file=sys.stderr, flush=True)
    summary = {
        "driver": args.driver,
        "messages": args.messages,
        "streams": args.streams,
        "batch": args.batch,
        "cpus": os.cpu_count(),
    }
    for batched, name in ((False, "single"), (True, "batch")):
        summary[f"{name}_cpu_us_per_message"] = statistics.median(
            r["cpu_us_per_message"] for r in runs[batched]
        )
        summary[f"{name}_messages_per_s"] = statistics.median(
            r["messages_per_s"] for r in runs[batched]
        )
        summary[f"{name}_runs"] = [r["cpu_us_per_message"] for r in runs[batched]]
    return summary


if __name__ == "__main__":
    arguments = parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    summary = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps(summary))
    else:
        single = summary["single_cpu_us_per_message"]
        batch = summary["batch_cpu_us_per_message"]
        print(
            f"{arguments.driver}: server CPU per message {single:.1f} us single, "
            f"{batch:.1f} us in batches of {arguments.batch} ({single / batch:.1f}x less); "
            f"{summary['single_messages_per_s']:,} vs {summary['batch_messages_per_s']:,} msgs/s"
        )
