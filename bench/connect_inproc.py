"""The Python cost of one connect, with no socket: the server's protocol fed a
``GET /events`` through a transport that only records what it is given.

It measures what bench/connect.py cannot separate from uvloop and the kernel:
gochan's own work per connect, from ``connection_made`` through the request's
parse, the route, the client, the topics and the stream, to the head and
first frame handed to the transport (the hub's flush included: the loop runs
every 100 connects). The topics are subscribed by a warm-up first, as they
are for all but the first connects of a storm. Streams are kept open, so the
garbage collector sees the heap grow as it does in a server.

``--streamer-only`` leaves out the HTTP side (protocol, parse, router) and
does only what the router asks of the streamer for such a connect: check the
topics, create the client, hold its topics, open its stream with the same
head and first frame. The difference between the two is what HTTP and
routing cost per connect. ``--slow-connect`` turns the connect fast path
off (``fast_connect=false``), so every connect is parsed by httptools and
answered by the events route. ``--nats URL`` puts the NATS driver under
the streamer (a nats-server at URL): a connect that names a topic nobody
holds yet then waits for the broker's SUB and PONG, as gochan-nats does, and
the figure is the wall time until every stream is open, with the process's
CPU time per connect beside it.

Usage::

    python bench/connect_inproc.py                      # 10,000 connects, 3 rounds
    python bench/connect_inproc.py --streamer-only      # the streamer's share alone
    python bench/connect_inproc.py --slow-connect       # without the connect fast path
    python bench/connect_inproc.py --profile 30         # cProfile, the 30 costliest functions
    python bench/connect_inproc.py --nats nats://127.0.0.1:4222 --topics 20000 --per-conn-topics 1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gochan import Config, Streamer
from gochan.drivers.nats import NatsDriver
from gochan.server.app import Server
from gochan.server.http import parse_query, stream_head

WARMUP = 200
SETTLE_EVERY = 100


class Transport:
    """What the protocol and the hub call on a transport, doing nothing but
    keep what is written (no ``socket``: the hub writes through write())."""

    __slots__ = ("closed", "peername", "protocol", "written")

    def __init__(self, peername: tuple[str, int]) -> None:
        self.peername = peername
        self.protocol: Any = None
        self.written = 0
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peername if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.written += sum(map(len, parts))

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def request(i: int, topics: int, per_conn: int) -> bytes:
    """compare.py's load generator's request for connection ``i``."""
    query = "&".join(f"topic=Topic{(i * per_conn + k) % topics}" for k in range(per_conn))
    return (
        f"GET /events?{query} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: sse_loadgen\r\n\r\n"
    ).encode()


def transport_of(i: int) -> Transport:
    """Connection ``i``'s transport, from an address of its own."""
    return Transport((f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 40000))


async def settle(i: int) -> None:
    if i % SETTLE_EVERY == SETTLE_EVERY - 1:
        for _ in range(2):  # the hub's flush, a subscribing task's step
            await asyncio.sleep(0)


async def connect(server: Server, i: int, data: bytes, kept: list[Transport]) -> None:
    protocol = server.protocol_factory()
    transport = transport_of(i)
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.data_received(data)
    kept.append(transport)
    await settle(i)


async def connect_streamer_only(server: Server, i: int, data: bytes, kept: list[Transport]) -> None:
    """What the router has the streamer do for ``data``'s connect, no more
    (the stream's head and first frames built by the router's own code)."""
    streamer = server.streamer
    transport = transport_of(i)
    query = data[data.index(b"?") + 1 : data.index(b" HTTP/")].decode("latin-1")
    topics = streamer.check_topics(parse_query(query).get("topic", ()))
    client = streamer.create_client(transport.peername[0])
    if not streamer.add_held_topics(client, topics):
        raise RuntimeError("a topic was not held: the warm-up should have held them all")
    reply = server.router._open_stream(client, [], "", None)
    head = stream_head(reply.headers) + reply.preamble
    transport.protocol = streamer.open_stream(client, transport, head, "", server)  # type: ignore[arg-type]
    kept.append(transport)
    await settle(i)


async def all_open(kept: list[Transport], total: int) -> None:
    """Wait until every connect has its stream and its head is written
    (those waiting on the broker too)."""
    while sum(1 for t in kept if t.protocol is not None and t.written) < total:
        await asyncio.sleep(0.001)


async def round_once(
    args: argparse.Namespace, profile: cProfile.Profile | None
) -> tuple[float, float]:
    """Wall and CPU microseconds per measured connect."""
    total = args.connections + WARMUP
    config = Config(
        max_connections=total + 100,
        max_clients=total + 100,
        connection_rate_per_peer=0,
        fast_connect=args.fast_connect,
    )
    requests = [request(i, args.topics, args.per_conn_topics) for i in range(args.topics)]
    driver = NatsDriver(args.nats, prefix=f"inproc{time.time_ns()}.") if args.nats else None
    async with Streamer(config, driver=driver) as streamer:
        server = Server(streamer, config, sweep=False)
        gc.collect()
        gc.freeze()  # as the server does once it listens
        kept: list[Transport] = []
        for i in range(WARMUP):
            await connect(server, i, requests[i % len(requests)], kept)
        for _ in range(5):
            await asyncio.sleep(0)
        await all_open(kept, WARMUP)
        if profile is not None:
            profile.enable()
        started, cpu = time.perf_counter(), time.process_time()
        measured = connect_streamer_only if args.streamer_only else connect
        for i in range(WARMUP, total):
            await measured(server, i, requests[i % len(requests)], kept)
        await all_open(kept, total)
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        if profile is not None:
            profile.disable()
        # A stream is made the transport's protocol once its head is written.
        streams = sum(1 for t in kept if t.protocol is not None and t.written and not t.closed)
        if streams != total:
            raise RuntimeError(f"only {streams} of {total} connects opened a stream")
    gc.unfreeze()
    return took / args.connections * 1e6, cpu / args.connections * 1e6


async def main(args: argparse.Namespace) -> None:
    if args.profile:
        profile = cProfile.Profile()
        us, _cpu = await round_once(args, profile)
        print(f"{us:.1f} us per connect under cProfile (its overhead included)")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
        return
    results = [await round_once(args, None) for _ in range(args.rounds)]
    runs, cpus = [r[0] for r in results], [r[1] for r in results]
    print(
        f"{args.connections} connects x {args.per_conn_topics} of {args.topics} topics"
        f"{' (streamer only)' if args.streamer_only else ''}"
        f"{' on NATS' if args.nats else ''}: "
        f"{statistics.median(runs):.1f} us per connect (median; runs "
        + ", ".join(f"{r:.1f}" for r in runs)
        + f"), CPU {statistics.median(cpus):.1f} us (runs "
        + ", ".join(f"{c:.1f}" for c in cpus)
        + ")"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--per-conn-topics", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--streamer-only", action="store_true", help="leave out the protocol, parse and router"
    )
    parser.add_argument(
        "--slow-connect",
        dest="fast_connect",
        action="store_false",
        help="turn the connect fast path off (fast_connect=false): httptools and events()",
    )
    parser.add_argument(
        "--nats", metavar="URL", default="", help="the NATS driver on this nats-server"
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="one cProfile round; show N functions"
    )
    uvloop.run(main(parser.parse_args()))
