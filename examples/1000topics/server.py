"""The 1000-topics example: a gochan server whose own publisher sends
``{"payload":"Topic42 <t>"}`` round-robin over N topics, like the original Go
gochan example. ``<t>`` is a monotonic-clock timestamp in ns, so receivers on
the same machine can compute latency.

    python examples/1000topics/server.py --topics 1000 --interval 0.001
    python examples/1000topics/clients.py --connections 1000

The server also serves this directory: open http://127.0.0.1:3000/ for the
browser page (index.html), which subscribes with gochan.js and shows live rates.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path

import uvloop

from gochan import Config, Streamer

HERE = Path(__file__).resolve().parent


def payload(topic: str) -> bytes:
    return b'{"payload":"%s %d"}' % (topic.encode(), time.monotonic_ns())


async def publish_forever(streamer: Streamer, topics: list[str], interval: float) -> None:
    """Round-robin over the topics, one message every ``interval`` seconds
    (sent in batches when the interval is shorter than a loop tick)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while True:
        due = int((loop.time() - start) / interval) if interval > 0 else sent + 1000
        while sent < due:
            topic = topics[sent % len(topics)]
            await streamer.publish(topic, payload(topic))
            sent += 1
        await asyncio.sleep(max(interval, 0.001))


async def main(args: argparse.Namespace) -> None:
    config = Config(host=args.host, port=args.port, heartbeat=args.heartbeat, static_dir=str(HERE))
    topics = [f"Topic{i}" for i in range(args.topics)]
    async with Streamer(config) as streamer:
        server = await streamer.serve()
        print(
            f"1000topics: http://{args.host}:{server.port}/ (page), /events  "
            f"({args.topics} topics, one message every {args.interval}s)",
            flush=True,
        )
        publisher = asyncio.create_task(publish_forever(streamer, topics, args.interval))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        publisher.cancel()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--topics", type=int, default=1000, help="number of topics")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between two messages")
    parser.add_argument("--heartbeat", type=float, default=15.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
