"""The 1000-topics example: a gochan server whose own publisher sends every
topic one message per interval, like the original Go gochan example:
``{"payload":"Topic42 <t>"}`` on Topic0 ... Topic<N-1>, with the defaults
1,000 topics every 0.1 s (10 messages/s per topic, 10,000/s in all). ``<t>`` is
the wall-clock publish time in ns since the Unix epoch (time.time_ns()), so a
receiver on the same machine (a browser too) can compute latency.

    python examples/1000topics/server.py
    python examples/1000topics/server.py --topics 50 --interval 0.02
    python examples/1000topics/clients.py --connections 1000

The server also serves this directory: open http://127.0.0.1:3000/ for the
browser page (index.html), which subscribes with gochan.js and shows live
rates, latency and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import uvloop

from gochan import Config, Streamer
from gochan.config import DEFAULT_SHUTDOWN_RETRY_MAX_S, DEFAULT_SHUTDOWN_RETRY_MIN_S

T = TypeVar("T", int, float)
HERE = Path(__file__).resolve().parent
DEFAULT_TOPICS = 1000
DEFAULT_INTERVAL_S = 0.1  # every topic once per 0.1 s: 10 messages/s per topic
STEP_S = 0.005  # the publisher wakes at most every 5 ms and sends what is due by then


def payload(topic: str) -> bytes:
    return b'{"payload":"%s %d"}' % (topic.encode(), time.time_ns())


async def publish_forever(streamer: Streamer, topics: list[str], interval: float) -> None:
    """Send every topic one message per ``interval`` seconds, spread evenly
    over the interval (topic i at offset i/N of it) rather than in one burst,
    so each topic gets an exact period and the flow on a page is smooth. The
    schedule follows the loop clock: a late wake-up catches up (at most one
    round of every topic, after a long stall), never drifts."""
    loop = asyncio.get_running_loop()
    # The in-memory driver takes a message without a round trip; others are awaited.
    publish = streamer.publish_nowait if streamer.can_publish_nowait else None
    per_second = len(topics) / interval
    start = loop.time()
    sent = 0
    while True:
        due = int((loop.time() - start) * per_second)
        if due - sent > len(topics):
            sent = due - len(topics)  # same topic order: a whole number of rounds skipped
        while sent < due:
            topic = topics[sent % len(topics)]
            if publish is not None:
                publish(topic, payload(topic))
            else:
                await streamer.publish(topic, payload(topic))
            sent += 1
        next_due = start + (sent + 1) / per_second
        await asyncio.sleep(max(STEP_S, next_due - loop.time()))


async def main(args: argparse.Namespace) -> None:
    config = Config(
        host=args.host,
        port=args.port,
        heartbeat=args.heartbeat,
        static_dir=str(HERE),
        shutdown_retry_min=min(DEFAULT_SHUTDOWN_RETRY_MIN_S, args.shutdown_retry_max),
        shutdown_retry_max=args.shutdown_retry_max,
    )
    topics = [f"Topic{i}" for i in range(args.topics)]
    async with Streamer(config) as streamer:
        server = await streamer.serve()
        rate = args.topics / args.interval
        print(
            f"1000topics: http://{args.host}:{server.port}/ (page), /events  "
            f"({args.topics} topics, each one message every {args.interval}s: "
            f"{rate:,.0f} messages/s)",
            flush=True,
        )
        publisher = asyncio.create_task(publish_forever(streamer, topics, args.interval))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        publisher.cancel()


def positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type: ``kind(text)``, refused unless above zero."""

    def convert(text: str) -> T:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return convert


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument(
        "--topics", type=positive(int), default=DEFAULT_TOPICS,
        help=f"number of topics, Topic0 ... (default {DEFAULT_TOPICS})",
    )  # fmt: skip
    parser.add_argument(
        "--interval", type=positive(float), default=DEFAULT_INTERVAL_S,
        help=f"seconds between two messages on one topic (default {DEFAULT_INTERVAL_S})",
    )  # fmt: skip
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds (default 15)")
    parser.add_argument(
        "--shutdown-retry-max", type=positive(float), default=DEFAULT_SHUTDOWN_RETRY_MAX_S,
        help="when the server stops, the longest a page waits before it reconnects, "
        f"in seconds (default {DEFAULT_SHUTDOWN_RETRY_MAX_S:g})",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse()))
