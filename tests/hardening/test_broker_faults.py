"""Broker faults under steady publishing: every acknowledged message is delivered.

Each test starts a PRIVATE broker (never the system's), a real gochan node on
it (``Streamer`` serving on a free port) with one real SSE subscriber over a
real socket, and publishes numbered messages through ``POST /publish`` at a
steady rate while the broker is stopped, killed or frozen. At the end every
publish answered 2xx must have reached the subscriber: a publish is either
refused (non-2xx, the publisher knows to retry) or delivered, never
acknowledged and lost. Each test also checks that refusals did happen (the
fault really hit) and that delivery resumed within a bound once the broker
was back (a timeout, not a performance claim).

Per driver, what the broker promises and so what is asserted:

- NATS (core): at-most-once, but with ``publish_flush`` a 2xx means the
  server processed the PUB after this node's SUB, so the node has the
  message: zero acknowledged losses for stop (SIGTERM), kill (SIGKILL) and
  freeze (SIGSTOP past the request timeout, then SIGCONT).
- NATS JetStream: a 2xx means the stream stored the message, and the
  driver's consumer resumes after the last sequence it delivered: zero
  acknowledged losses (freeze).
- Redis pub/sub: at-most-once; messages published while this node's
  subscriber connection is resubscribing are dropped by Redis. The driver
  refuses publishes until the subscriptions are restored, and a PUBLISH that
  reached no subscriber of a topic the node holds is refused too: zero
  acknowledged losses.
- RabbitMQ: the node's queue is exclusive and goes with its connection, so
  messages routed while it reconnects are dropped (at-most-once for a
  non-durable queue); publishes are refused while not ready: zero
  acknowledged losses.
- MQTT: QoS 0 delivery is at-most-once by definition, and a broker restart
  loses the session; publishes are refused while not ready: zero
  acknowledged losses in practice, asserted.
- PostgreSQL: NOTIFY is delivered to sessions LISTENing when it commits;
  sessions die with the server, publishes are refused while not ready: zero
  acknowledged losses.

Run one scenario outside pytest, with its figures printed as JSON::

    python -m tests.hardening.test_broker_faults nats-freeze --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import pytest

from gochan import Config, Streamer
from tests.support import SSEStream

PUBLISH_INTERVAL_S = 0.02  # 50 publishes a second
PUBLISH_TIMEOUT_S = 15.0  # an HTTP publish answered later than this counts as refused
MAX_IN_FLIGHT = 1000
WARMUP_TIMEOUT_S = 10.0  # for the first message before the fault
STEADY_S = 0.5  # publishing before the fault and after the recovery
RECOVERY_TIMEOUT_S = 12.0  # delivery must resume within this after the fault ends
DRAIN_TIMEOUT_S = 5.0  # for the acknowledged messages still on their way
FREEZE_S = 7.0  # past the NATS driver's 5 s request timeout
# Reconnection backoff capped low so that recovery fits the bound above; the
# defaults (10 s) would only make the tests slower, not different.
QUICK_RECONNECT = {"reconnect_max": 1.0}


@dataclass
class Publish:
    n: int
    started: float
    ended: float
    status: int  # 0: no answer (connection error, timeout)


@dataclass
class Report:
    """What one scenario measured; times in seconds on the loop's clock."""

    driver: str
    fault: str
    hold_s: float
    sent: int = 0
    acked: int = 0
    refused: int = 0
    delivered: int = 0
    duplicates: int = 0
    acked_lost: int = 0
    lost_sample: list[int] = field(default_factory=list)  # the first few lost
    # From the end of the fault (broker resumed or restarted) to the first
    # delivery of a message published after it; None: never within the bound.
    outage_s: float | None = None
    # Acknowledged while the driver said it was not ready, start to answer.
    acked_while_not_ready: int = 0
    not_ready_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Fault:
    """A broker fault: ``begin`` and ``end`` are blocking (run in a thread),
    ``hold_s`` apart."""

    name: str
    begin: Callable[[], None]
    end: Callable[[], None]
    hold_s: float


async def run_scenario(driver: str, options: dict[str, Any], fault: Fault) -> Report:
    """gochan on the broker, an SSE subscriber, steady publishing through
    ``fault``; returns what was acknowledged, refused and delivered."""
    loop = asyncio.get_running_loop()
    topic = "fault" + secrets.token_hex(4)
    report = Report(driver, fault.name, fault.hold_s)
    streamer = Streamer(Config(port=0, driver=driver, driver_options=dict(options)))
    await streamer.start()
    tasks: list[asyncio.Task[Any]] = []
    try:
        server = await streamer.serve()
        stream = await SSEStream.open(server.port, f"/events?topic={topic}")
        assert (await stream.config())["subscriptions"] == [topic]
        arrivals: dict[int, float] = {}
        publishes: list[Publish] = []
        not_ready: list[tuple[float, float]] = []  # spans the driver was not ready
        running = True

        async def collect() -> None:
            while True:
                event = await stream.event(timeout=3600)
                if event.get("event") != topic:
                    raise AssertionError(f"unexpected frame {event}")
                n = int(event["data"])
                if n in arrivals:
                    report.duplicates += 1
                else:
                    arrivals[n] = loop.time()

        async def watch_readiness() -> None:
            # A span runs from the first to the LAST sample that saw the driver
            # not ready: it became ready somewhere before the next sample, and
            # on a loaded machine that gap can be long, so a publish answered
            # in it is not counted as answered while not ready.
            since: float | None = None
            last_seen = 0.0
            while True:
                ready = streamer.driver.ready
                now = loop.time()
                if not ready:
                    last_seen = now
                    if since is None:
                        since = now
                elif since is not None:
                    not_ready.append((since, last_seen))
                    since = None
                if not running and since is None:
                    return
                await asyncio.sleep(0.005)

        async def publish_one(http: httpx.AsyncClient, n: int) -> None:
            started = loop.time()
            try:
                r = await http.post("/publish", params={"topic": topic}, content=str(n).encode())
                status = r.status_code
            except httpx.HTTPError:
                status = 0
            publishes.append(Publish(n, started, loop.time(), status))

        async def publish_steadily(http: httpx.AsyncClient) -> None:
            in_flight: set[asyncio.Task[None]] = set()
            n = 0
            next_at = loop.time()
            while running:
                if len(in_flight) < MAX_IN_FLIGHT:
                    task = loop.create_task(publish_one(http, n))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    n += 1
                next_at += PUBLISH_INTERVAL_S
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await asyncio.gather(*in_flight)

        async def wait_until(pred: Callable[[], bool], timeout: float) -> bool:
            deadline = loop.time() + timeout
            while not pred():
                if loop.time() > deadline:
                    return False
                await asyncio.sleep(0.01)
            return True

        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=100)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", limits=limits, timeout=PUBLISH_TIMEOUT_S
        ) as http:
            tasks.append(loop.create_task(collect()))
            tasks.append(loop.create_task(watch_readiness()))
            publisher = loop.create_task(publish_steadily(http))
            tasks.append(publisher)
            assert await wait_until(lambda: bool(arrivals), WARMUP_TIMEOUT_S), "no delivery"
            await asyncio.sleep(STEADY_S)
            await asyncio.to_thread(fault.begin)
            await asyncio.sleep(fault.hold_s)
            await asyncio.to_thread(fault.end)
            ended = loop.time()
            resumed = await wait_until(
                lambda: any(p.started >= ended and p.n in arrivals for p in publishes[-200:]),
                RECOVERY_TIMEOUT_S,
            )
            if resumed:
                report.outage_s = round(
                    min(arrivals[p.n] for p in publishes if p.started >= ended and p.n in arrivals)
                    - ended,
                    3,
                )
                await asyncio.sleep(STEADY_S)
            running = False
            await publisher
        acked = {p.n for p in publishes if 200 <= p.status < 300}
        await wait_until(lambda: acked <= arrivals.keys(), DRAIN_TIMEOUT_S)
        await tasks[1]
        report.sent = len(publishes)
        report.acked = len(acked)
        report.refused = report.sent - report.acked
        report.delivered = len(arrivals)
        lost = sorted(acked - arrivals.keys())
        report.acked_lost = len(lost)
        report.lost_sample = lost[:10]
        report.not_ready_s = round(sum(b - a for a, b in not_ready), 3)
        report.acked_while_not_ready = sum(
            1
            for p in publishes
            if p.n in acked and any(a <= p.started and p.ended <= b for a, b in not_ready)
        )
        for p in publishes:
            report.statuses[str(p.status)] = report.statuses.get(str(p.status), 0) + 1
        await stream.close()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await streamer.close()
    return report


def check(report: Report) -> None:
    """What every scenario must show."""
    print(report.summary())
    assert report.outage_s is not None, f"delivery did not resume: {report.summary()}"
    assert report.refused > 0, f"the fault refused nothing: is it a fault? {report.summary()}"
    assert report.acked_lost == 0, f"acknowledged and lost: {report.summary()}"
    assert report.acked_while_not_ready == 0, report.summary()


# -- brokers ---------------------------------------------------------------------
# Each broker is started by a fixture (outside the test's own timeout: a
# RabbitMQ node takes seconds) and is this test's alone.


def process_fault(server: Any, kind: str, hold_s: float) -> Fault:
    """A :class:`~tests.drivers._process.ServerProcess` stopped ("stop":
    SIGTERM, "kill": SIGKILL) and started again on the same port ``hold_s``
    later, or frozen ("freeze": SIGSTOP, then SIGCONT)."""
    from tests.drivers._process import stop_process

    if kind == "freeze":
        return Fault(
            kind,
            server.freeze,
            server.thaw,
            hold_s,
        )
    sig = signal.SIGKILL if kind == "kill" else signal.SIGTERM

    def begin() -> None:
        proc, server.proc = server.proc, None
        stop_process(proc, sig)

    return Fault(kind, begin, server.start, hold_s)


def halt_fault(broker: Any, kind: str, hold_s: float, stop_sig: int, kill_sig: int) -> Fault:
    """A broker with ``halt(sig)`` and ``resume()`` (RabbitMQ, PostgreSQL)."""
    sig = kill_sig if kind == "kill" else stop_sig
    return Fault(kind, lambda: broker.halt(sig), broker.resume, hold_s)


@contextlib.contextmanager
def nats_broker() -> Iterator[Any]:
    from tests.drivers._nats_server import NatsServer

    yield from NatsServer.running()


@contextlib.contextmanager
def redis_broker() -> Iterator[Any]:
    from tests.drivers._redis_server import RedisServer

    yield from RedisServer.running()


@contextlib.contextmanager
def rabbitmq_broker() -> Iterator[Any]:
    from tests.drivers._rabbitmq_server import start_node

    broker = start_node()
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def mqtt_broker() -> Iterator[Any]:
    from tests.drivers._mqtt_server import Mosquitto

    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@contextlib.contextmanager
def postgres_broker() -> Iterator[Any]:
    from tests.drivers._postgres_server import start_cluster

    server = start_cluster()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Setup:
    """How to run gochan's ``driver`` on a private broker and hurt it."""

    driver: str
    broker: Callable[[], contextlib.AbstractContextManager[Any]]
    options: Callable[[Any], dict[str, Any]]
    fault: Callable[[Any, str, float], Fault]
    kinds: tuple[str, ...]


SETUPS = {
    "nats": Setup(
        # The driver's defaults (request timeout 5 s, ping interval 20 s).
        "nats",
        nats_broker,
        lambda server: {"url": server.url},
        process_fault,
        ("stop", "kill", "freeze"),
    ),
    "natsjs": Setup(
        "nats",
        nats_broker,
        lambda server: {"url": server.url, "jetstream": True, "prefix": "gochan."},
        process_fault,
        ("stop", "kill", "freeze"),
    ),
    "redis": Setup(
        "redis",
        redis_broker,
        lambda server: {"url": server.url},
        process_fault,
        ("stop", "kill"),
    ),
    "rabbitmq": Setup(
        "rabbitmq",
        rabbitmq_broker,
        lambda broker: {"url": broker.url, **QUICK_RECONNECT},
        lambda broker, kind, hold_s: halt_fault(
            broker, kind, hold_s, signal.SIGTERM, signal.SIGKILL
        ),
        ("stop", "kill"),
    ),
    "mqtt": Setup(
        "mqtt",
        mqtt_broker,
        lambda broker: {**broker.broker().driver_options(), **QUICK_RECONNECT},
        lambda broker, kind, hold_s: Fault(
            kind, broker.kill if kind == "kill" else broker.stop, broker.start, hold_s
        ),
        ("stop", "kill"),
    ),
    "postgres": Setup(
        "postgres",
        postgres_broker,
        lambda server: {"dsn": server.dsn, **QUICK_RECONNECT},
        # SIGINT: fast shutdown; SIGQUIT: every backend gone at once, no
        # shutdown checkpoint (a crash).
        lambda server, kind, hold_s: halt_fault(
            server, kind, hold_s, signal.SIGINT, signal.SIGQUIT
        ),
        ("stop", "kill"),
    ),
}


async def scenario(name: str, broker: Any, kind: str, hold_s: float) -> Report:
    setup = SETUPS[name]
    return await run_scenario(
        setup.driver, setup.options(broker), setup.fault(broker, kind, hold_s)
    )


@pytest.fixture
def nats() -> Iterator[Any]:
    with nats_broker() as server:
        yield server


@pytest.fixture
def redis() -> Iterator[Any]:
    with redis_broker() as server:
        yield server


@pytest.fixture
def rabbitmq() -> Iterator[Any]:
    with rabbitmq_broker() as broker:
        yield broker


@pytest.fixture
def mqtt() -> Iterator[Any]:
    with mqtt_broker() as broker:
        yield broker


@pytest.fixture
def postgres() -> Iterator[Any]:
    with postgres_broker() as server:
        yield server


@pytest.mark.parametrize(("kind", "hold_s"), [("stop", 1.0), ("kill", 1.0), ("freeze", FREEZE_S)])
async def test_nats(nats: Any, kind: str, hold_s: float) -> None:
    check(await scenario("nats", nats, kind, hold_s))


async def test_nats_jetstream_freeze(nats: Any) -> None:
    check(await scenario("natsjs", nats, "freeze", FREEZE_S))


@pytest.mark.parametrize("kind", ["stop", "kill"])
async def test_redis(redis: Any, kind: str) -> None:
    check(await scenario("redis", redis, kind, 1.0))


async def test_rabbitmq(rabbitmq: Any) -> None:
    check(await scenario("rabbitmq", rabbitmq, "kill", 0.5))


async def test_mqtt(mqtt: Any) -> None:
    check(await scenario("mqtt", mqtt, "kill", 1.0))


async def test_postgres(postgres: Any) -> None:
    check(await scenario("postgres", postgres, "stop", 1.0))


# -- running one scenario by hand ---------------------------------------------------


def main(argv: list[str]) -> int:
    import uvloop

    names = [f"{name}-{kind}" for name, setup in SETUPS.items() for kind in setup.kinds]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=names)
    parser.add_argument("--hold", type=float, default=1.0, help="seconds the fault lasts")
    args = parser.parse_args(argv)
    name, _, kind = args.scenario.partition("-")
    started = time.monotonic()
    with SETUPS[name].broker() as broker:
        report = uvloop.run(scenario(name, broker, kind, args.hold))
    print(json.dumps(asdict(report)))
    print(f"scenario took {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0 if report.acked_lost == 0 and report.outage_s is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
