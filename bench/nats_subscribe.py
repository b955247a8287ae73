"""What a NATS subscribe costs the driver: CPU and wall time per topic, for
subscribes made one after another and all at once.

``NatsDriver.subscribe`` returns once the server has the SUB (a PING/PONG
after it). One after another (``serial``), every subscribe pays a whole
round trip: its PING, the PONG's read and the wakeups between. All at once
(``together``: one ``asyncio.gather``), they share round trips
(``NatsDriver._round_trip``), so what is left is the per-topic work. The
difference is what a round trip costs this process; connects on per-user
topics pay the first figure when they come one by one, and approach the
second under load.

``--jetstream`` subscribes through JetStream instead (an ordered push
consumer per topic on a stream of the benchmark's own, deleted after), as
``--nats-jetstream`` does.

It needs a nats-server (``--url``, by default the local one on 4222; with
JetStream enabled for ``--jetstream``); each round subscribes fresh topics
and unsubscribes them after.

Usage::

    python bench/nats_subscribe.py                    # 5,000 topics, 2 rounds of each
    python bench/nats_subscribe.py --topics 20000 --rounds 3
    python bench/nats_subscribe.py --jetstream --topics 1000
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import nats
import uvloop

from gochan.drivers.nats import NatsDriver


class Discard:
    """A receiver that drops everything: no message is published here."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


async def one_round(driver: NatsDriver, mode: str, count: int) -> tuple[float, float]:
    """CPU and wall seconds per subscribe of ``count`` fresh topics."""
    run = uuid.uuid4().hex[:8]
    topics = [f"bench.{run}.{i}" for i in range(count)]
    cpu, wall = time.process_time(), time.perf_counter()
    if mode == "serial":
        for topic in topics:
            await driver.subscribe(topic)
    else:
        await asyncio.gather(*(driver.subscribe(topic) for topic in topics))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    held = driver.stats()["broker"]["broker_subscriptions"]
    if held != count:
        raise SystemExit(f"{mode}: {held} of {count} topics subscribed")
    await asyncio.gather(*(driver.unsubscribe(topic) for topic in topics))
    return cpu / count, wall / count


async def main(args: argparse.Namespace) -> None:
    stream = f"BENCH_{uuid.uuid4().hex[:8].upper()}"
    options: dict[str, Any] = {"url": args.url}
    if args.jetstream:
        options.update(jetstream=True, prefix=f"{stream.lower()}.", stream=stream)
    driver = NatsDriver(**options)
    await driver.connect(Discard())
    try:
        for _ in range(args.rounds):
            for mode in ("serial", "together"):
                cpu, wall = await one_round(driver, mode, args.topics)
                print(
                    f"{mode:>8}: {cpu * 1e6:6.1f} us CPU, {wall * 1e6:6.1f} us wall per subscribe"
                )
    finally:
        await driver.close()
        if args.jetstream:
            nc = await nats.connect(args.url)
            try:
                await nc.jetstream().delete_stream(stream)
            finally:
                await nc.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--topics", type=int, default=5000, help="topics per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternated")
    p.add_argument("--jetstream", action="store_true", help="subscribe through JetStream")
    return p.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
