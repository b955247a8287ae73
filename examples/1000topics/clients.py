"""Browser stand-ins for the 1000-topics example: N SSE connections, each
subscribed at connect to ``--per-conn`` topics (spread so every topic gets the
same share), counting events and publish-to-receive latency from the payload
timestamps (the server's time.time_ns(): run this on the same machine).

    python examples/1000topics/server.py
    python examples/1000topics/clients.py --connections 1000 --duration 10

With the server's defaults (1,000 topics, each every 0.1 s) and these (10
topics per connection), each connection receives 100 messages/s.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from urllib.parse import urlsplit

import uvloop


class Stats:
    def __init__(self) -> None:
        self.events = 0
        self.latencies_us: list[int] = []
        self.connected = 0
        self.errors = 0


async def client(
    host: str, port: int, topics: list[str], stats: Stats, stop: asyncio.Event
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats.errors += 1
        return
    query = "&".join(f"topic={t}" for t in topics)
    writer.write(f"GET /events?{query} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            stats.errors += 1
            return
        stats.connected += 1
        buffer = b""
        while not stop.is_set():
            chunk = await reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            *frames, buffer = buffer.split(b"\n\n")
            now = time.time_ns()  # the payloads carry the server's wall clock
            for frame in frames:
                if frame.startswith(b"event: Topic"):
                    stats.events += 1
                    # data: {"payload":"Topic42 <t>"}
                    stamp = frame.rsplit(b" ", 1)[-1].rstrip(b'"}')
                    if stamp.isdigit():
                        stats.latencies_us.append((now - int(stamp)) // 1000)
    except (OSError, asyncio.IncompleteReadError):
        stats.errors += 1
    finally:
        writer.close()


def percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> int:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 3000
    stats = Stats()
    stop = asyncio.Event()
    tasks = []
    for i in range(args.connections):
        topics = [f"Topic{(i * args.per_conn + k) % args.topics}" for k in range(args.per_conn)]
        tasks.append(asyncio.create_task(client(host, port, topics, stats, stop)))
        if i % 100 == 99:
            await asyncio.sleep(0)
    await asyncio.sleep(args.duration)
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = stats.latencies_us
    print(
        f"connections {stats.connected}/{args.connections}, errors {stats.errors}, "
        f"events {stats.events} ({stats.events / args.duration:.0f}/s), latency us "
        f"p50 {percentile(lat, 0.5)} p90 {percentile(lat, 0.9)} p99 {percentile(lat, 0.99)}",
        flush=True,
    )
    return 0 if stats.connected == args.connections and stats.events > 0 else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--topics", type=int, default=1000, help="topics the server publishes on")
    parser.add_argument("--per-conn", type=int, default=10, help="topics per connection")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to listen")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(uvloop.run(main(parse())))
