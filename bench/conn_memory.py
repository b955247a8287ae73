"""Where an idle stream's memory goes: the server's RSS and its Python
allocations per connection, by source line.

The server runs in this process under tracemalloc; a child process opens N
streams (``GET /events?topic=...`` with K topics each, as compare.py's
1000topics workload does) and holds them. Between a snapshot taken after a
warm-up batch and one taken after the N streams, the allocations that grew are
grouped by the line that made them, divided by N. Lines inside uvloop's C code
show up under the event loop's own frames (asyncio/runners.py or
uvloop/__init__.py). tracemalloc itself costs memory, so the RSS figure here
is above compare.py's (which runs the server without it).

Usage:
    python bench/conn_memory.py                       # 5,000 streams x 10 of 1,000 topics
    python bench/conn_memory.py --connections 2000 --per-conn-topics 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gochan import Config, Streamer

WARMUP = 200

CLIENT = textwrap.dedent(
    """
    import socket, sys, time
    port, start, count, topics, per = map(int, sys.argv[1:6])
    socks = []
    for i in range(start, start + count):
        s = socket.create_connection(("127.0.0.1", port))
        q = "&".join(f"topic=Topic{(i * per + k) % topics}" for k in range(per))
        s.sendall(f"GET /events?{q} HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n".encode())
        got = b""
        while b"\\n\\n" not in got:
            got += s.recv(65536)
        socks.append(s)
    print("ready", flush=True)
    sys.stdin.read()  # hold the streams until told to go
    """
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def hold(
    port: int, start: int, count: int, args: argparse.Namespace
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(port), str(start), str(count),
         str(args.topics), str(args.per_conn_topics)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if line.strip() != "ready":
        raise RuntimeError("the client process failed")
    return proc


async def main(args: argparse.Namespace) -> None:
    config = Config(
        port=0,
        max_connections=args.connections + WARMUP + 100,
        max_connections_per_peer=args.connections + WARMUP + 100,
        max_clients_per_peer=args.connections + WARMUP + 100,
        connection_rate_per_peer=0,
    )
    async with Streamer(config) as streamer:
        server = await streamer.serve()
        warm = await hold(server.port, 0, WARMUP, args)
        gc.collect()
        tracemalloc.start(1)
        before_rss, before = rss_bytes(), tracemalloc.take_snapshot()
        held = await hold(server.port, WARMUP, args.connections, args)
        await asyncio.sleep(0.5)
        gc.collect()
        after_rss, after = rss_bytes(), tracemalloc.take_snapshot()
        n = args.connections
        stats = after.compare_to(before, "lineno")
        traced = sum(s.size_diff for s in stats)
        print(f"{n} streams x {args.per_conn_topics} topics of {args.topics}")
        print(
            f"server RSS per stream (tracemalloc on): {(after_rss - before_rss) / n / 1024:.2f} KiB"
        )
        print(f"Python allocations per stream: {traced / n:.0f} B")
        print(f"{'B/stream':>9} {'objs':>5}  line")
        for stat in stats[: args.top]:
            if stat.size_diff / n < 8:
                break
            frame = stat.traceback[0]
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            print(f"{stat.size_diff / n:9.0f} {stat.count_diff / n:5.2f}  {where}")
        for proc in (held, warm):
            proc.communicate("")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--per-conn-topics", type=int, default=10)
    parser.add_argument("--top", type=int, default=20, help="lines shown")
    uvloop.run(main(parser.parse_args()))
