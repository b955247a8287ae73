"""What GET /metrics costs: a gochan server holding N open streams (default
10,000, each on 10 of 1,000 topics) scraped R times in each format, with the
answer's wall time and the server's CPU time per scrape (from /proc).

The server is ``python -m gochan.server`` on a free loopback port (the working
tree, or ``--rev`` exported and built under bench/results/), with heartbeats
off for the run so that the CPU it uses between scrapes is the scrapes'. The
streams are opened from this process, so it needs N descriptors and the
server as many (``ulimit -n``).

Usage:
    python bench/scrape.py                    # 10,000 streams, 100 scrapes per format
    python bench/scrape.py --rev 275d162      # the hand-rendered page before prometheus-client
    python bench/scrape.py --streams 1000 --scrapes 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _server
import uvloop
from _server import RESULTS, cpu_s, free_port, rss_kib, stop_process

DEFAULT_STREAMS = 10_000
DEFAULT_SCRAPES = 100
DEFAULT_TOPICS = 1000
TOPICS_PER_STREAM = 10
CONNECT_CONCURRENCY = 200
IO_TIMEOUT_S = 30.0
IDLE_S = 2.0  # the server's CPU over this long with no scrape: the baseline
FORMATS = {
    "prometheus": "",
    "openmetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8",
}

Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[scrape] {msg}", file=sys.stderr, flush=True)


async def open_stream(port: int, i: int, topics: int) -> asyncio.StreamWriter:
    names = "&".join(f"topic=Topic{(i * TOPICS_PER_STREAM + k) % topics}" for k in range(10))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /events?{names} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT_S)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream {i}: {head[:80]!r}")
    await asyncio.wait_for(reader.readuntil(b"\n\n"), IO_TIMEOUT_S)  # the first frame
    return writer


async def get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accept: str
) -> tuple[bytes, str]:
    extra = f"Accept: {accept}\r\n" if accept else ""
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    if not head.startswith("HTTP/1.1 200"):
        raise RuntimeError(f"GET /metrics: {head.splitlines()[0]}")
    fields = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(fields["content-length"]))
    return body, fields.get("content-type", "")


async def measure(args: argparse.Namespace, pid: int, port: int) -> Json:
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    t0 = time.monotonic()

    async def one(i: int) -> asyncio.StreamWriter:
        async with limit:
            return await open_stream(port, i, args.topics)

    streams = await asyncio.gather(*(one(i) for i in range(args.streams)))
    log(f"{len(streams):,} streams open in {time.monotonic() - t0:.1f} s")
    result: Json = {"streams": len(streams), "server_rss_kib": rss_kib(pid), "formats": {}}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.sleep(1.0)  # the connect storm's after-work settles
        idle0 = cpu_s(pid)
        await asyncio.sleep(IDLE_S)
        idle_cpu_per_s = (cpu_s(pid) - idle0) / IDLE_S
        result["idle_server_cpu_share"] = idle_cpu_per_s
        for name, accept in FORMATS.items():
            await get(reader, writer, accept)  # warm
            walls = []
            size, ctype = 0, ""
            started, cpu0 = time.monotonic(), cpu_s(pid)
            for _ in range(args.scrapes):
                t = time.perf_counter()
                body, ctype = await get(reader, writer, accept)
                walls.append(time.perf_counter() - t)
                size = len(body)
            elapsed, cpu = time.monotonic() - started, cpu_s(pid) - cpu0
            server_cpu = max(0.0, cpu - idle_cpu_per_s * elapsed) / args.scrapes
            walls.sort()
            result["formats"][name] = {
                "content_type": ctype,
                "bytes": size,
                "wall_ms_p50": statistics.median(walls) * 1e3,
                "wall_ms_p90": walls[int(len(walls) * 0.9) - 1] * 1e3,
                "wall_ms_max": walls[-1] * 1e3,
                "server_cpu_ms_per_scrape": server_cpu * 1e3,
            }
    finally:
        writer.close()
        for stream in streams:
            stream.close()
    return result


def report(r: Json) -> str:
    lines = [
        f"GET /metrics with {r['streams']:,} open streams (server RSS {r['server_rss_kib']:,} KiB,"
        f" idle CPU {r['idle_server_cpu_share'] * 100:.1f}%), {r['scrapes']} scrapes per format",
        f"{'format':<12} {'bytes':>7} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} "
        f"{'server CPU ms/scrape':>21}  content type",
    ]
    for name, f in r["formats"].items():
        lines.append(
            f"{name:<12} {f['bytes']:>7,} {f['wall_ms_p50']:>8.2f} {f['wall_ms_p90']:>8.2f} "
            f"{f['wall_ms_max']:>8.2f} {f['server_cpu_ms_per_scrape']:>21.2f}  {f['content_type']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS)
    p.add_argument("--topics", type=int, default=DEFAULT_TOPICS)
    p.add_argument("--scrapes", type=int, default=DEFAULT_SCRAPES, help="per format")
    p.add_argument("--rev", help="run the server from this commit instead of the working tree")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    tree = _server.source_tree(args.rev, log)
    port = free_port()
    room = str(args.streams + 100)
    flags = ["--log-level", "warning", "--heartbeat", "3600"]
    for flag in ("--max-connections", "--max-clients", "--max-connections-per-peer",
                 "--max-clients-per-peer"):  # fmt: skip
        flags += [flag, room]
    cmd = _server.server_command(port, flags)
    log_path = RESULTS / f"scrape-server-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log(f"server: {' '.join(cmd)} in {tree} (output to {log_path})")
    with open(log_path, "w") as server_log:
        proc = _server.start_server(cmd, tree, port, server_log)
    try:
        result = uvloop.run(measure(args, proc.pid, port))
    finally:
        with contextlib.suppress(Exception):
            stop_process(proc)
    result.update(scrapes=args.scrapes, rev=args.rev, server_tree=str(tree))
    print(report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
