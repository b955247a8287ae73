"""End-to-end checks every broker driver must pass, through gochan's HTTP
surface: real gochan servers (each with its own broker connection, as two
processes would have), real HTTP clients, the real broker.

A driver's ``test_<broker>_e2e.py`` builds a :class:`Broker` and calls these.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
import orjson

from gochan import Config, Streamer
from gochan.server import Server
from tests.support import SSEStream, free_port

DELIVERY_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 30.0
REPLAY_MISSED = 4  # messages a reconnecting browser missed, in the replay check


@dataclass
class Broker:
    driver: str
    options: dict[str, Any]
    # Publish with the broker's own client, as any other program would.
    publish: Callable[[str, bytes], Awaitable[None]]
    # An outage: stop the broker and start it again on the same address.
    restart: Callable[[], Awaitable[None]] | None = None
    # Whether the broker itself holds a subscription for this topic.
    subscribed: Callable[[str], Awaitable[bool]] | None = None
    prefix: str = field(default_factory=lambda: "e2e" + secrets.token_hex(3))

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"


@contextlib.asynccontextmanager
async def nodes(broker: Broker, count: int = 2) -> AsyncIterator[list[Server]]:
    """``count`` gochan servers on the broker, each with its own connection."""
    streamers: list[Streamer] = []
    servers: list[Server] = []
    try:
        for _ in range(count):
            config = Config(port=0, driver=broker.driver, driver_options=dict(broker.options))
            streamer = Streamer(config)
            streamers.append(streamer)
            await streamer.start()
            servers.append(await streamer.serve())
        yield servers
    finally:
        for streamer in streamers:
            await streamer.close()


class ProcessNode(NamedTuple):
    port: int


@contextlib.asynccontextmanager
async def process_node(broker: Broker) -> AsyncIterator[ProcessNode]:
    """A gochan server as its own process (``python -m gochan.server``), its
    driver options given as ``--<driver>-<option>`` flags."""
    port = free_port()
    flags = [f"--{broker.driver}-{k.replace('_', '-')}={v}" for k, v in broker.options.items()]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gochan.server", "--port", str(port), "--log-level", "warning",
        "--driver", broker.driver, *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        banner = await asyncio.wait_for(proc.stdout.readline(), 30)
        if b"listening" not in banner:
            raise AssertionError(f"gochan did not start: {(await proc.stderr.read()).decode()}")
        yield ProcessNode(port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


async def next_data(stream: SSEStream, topic: str, timeout: float = DELIVERY_TIMEOUT_S) -> str:
    """The data of the next frame for ``topic`` (heartbeats skipped)."""
    event = await stream.event(timeout)
    assert event.get("event") == topic, event
    return event["data"]


async def post_publish(port: int, topic: str, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"http://127.0.0.1:{port}/publish", params={"topic": topic}, content=body
        )
    assert r.status_code in (200, 202), r.text
    return r


async def check_relay(broker: Broker) -> None:
    """Messages from the broker's own client arrive unchanged; messages
    published through either gochan process reach clients on both."""
    topic = broker.topic("relay")
    async with nodes(broker, 1) as (a,), process_node(broker) as b:
        streams = [await SSEStream.open(s.port, f"/events?topic={topic}") for s in (a, b)]
        for stream in streams:
            assert (await stream.config())["subscriptions"] == [topic]
        body = b'{"from":"broker"}\nsecond line'
        await broker.publish(topic, body)
        for stream in streams:
            assert await next_data(stream, topic) == body.decode()
        for node, text in ((a, "via a"), (b, "via b")):
            await post_publish(node.port, topic, text.encode())
            for stream in streams:
                assert await next_data(stream, topic) == text
        for stream in streams:
            await stream.no_frame(0.3)  # each message exactly once per node
            await stream.close()


async def check_subscription_lifecycle(broker: Broker) -> None:
    """A topic's broker subscription opens with its first client and closes
    after its last, through POST /update_subscriptions."""
    topic = broker.topic("life")
    async with nodes(broker, 1) as (node,):
        driver = node.streamer.driver
        base = f"http://127.0.0.1:{node.port}/update_subscriptions"
        streams = [await SSEStream.open(node.port, "/events") for _ in range(2)]
        ids = [(await s.config())["config"]["client_id"] for s in streams]
        async with httpx.AsyncClient() as http:
            for client_id in ids:
                r = await http.post(base, json={"client_id": client_id, "add": [topic]})
                assert r.json() == {"client_id": client_id, "subscriptions": [topic], "errors": []}
            assert driver.stats()["subscriptions"] == 1  # one for both clients
            if broker.subscribed is not None:
                assert await broker.subscribed(topic)
            await http.post(base, json={"client_id": ids[0], "remove": [topic]})
            assert driver.stats()["subscriptions"] == 1
            await http.post(base, json={"client_id": ids[1], "remove": [topic]})
            assert driver.stats()["subscriptions"] == 0
            if broker.subscribed is not None:
                await until(lambda: broker.subscribed(topic), False)
        for stream in streams:
            await stream.close()


async def check_broker_restart(broker: Broker) -> None:
    """The broker goes away and comes back mid-stream: /readyz says so, the
    driver reconnects and resubscribes, delivery resumes on the same stream."""
    assert broker.restart is not None
    topic = broker.topic("restart")
    async with nodes(broker, 1) as (node,):
        stream = await SSEStream.open(node.port, f"/events?topic={topic}")
        await stream.config()
        await post_publish(node.port, topic, b"before")
        assert await next_data(stream, topic) == "before"
        await broker.restart()
        async with httpx.AsyncClient() as http:
            base = f"http://127.0.0.1:{node.port}"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + RECOVERY_TIMEOUT_S
            while (await http.get(base + "/readyz")).status_code != 200:
                assert loop.time() < deadline, "driver did not become ready again"
                await asyncio.sleep(0.1)
            # Publish until one arrives: a broker may drop messages sent while
            # the resubscription is still on its way.
            received = ""
            while received != "after":
                assert loop.time() < deadline, "delivery did not resume"
                with contextlib.suppress(AssertionError):
                    await post_publish(node.port, topic, b"after")
                with contextlib.suppress(asyncio.TimeoutError):
                    received = await next_data(stream, topic, timeout=0.5)
            metrics = (await http.get(base + "/metrics")).text
        reconnects = next(
            line for line in metrics.splitlines() if line.startswith("gochan_broker_reconnects")
        )
        assert float(reconnects.split()[1]) >= 1, metrics
        await stream.close()


async def check_replay_on_the_same_node(
    broker: Broker, via_broker: bool = True, ordered: bool = True
) -> None:
    """A browser that lost its stream reconnects with ``Last-Event-ID``: the
    node (which kept the topic for the client's TTL) says ``recovered:true``
    and sends exactly the messages it missed, in order, then live ones.
    The missed ones are published through gochan and, when ``via_broker``,
    also by the broker's own client. ``ordered=False``: a broker that does
    not keep publish order for one topic (Kafka across partitions) may
    deliver them in another order, live and replayed alike."""
    topic = broker.topic("replay")
    url = f"/events?topic={topic}"  # a plain EventSource: no client id
    async with nodes(broker, 1) as (node,):
        driver = node.streamer.driver
        stream = await SSEStream.open(node.port, url)
        await stream.config()
        await post_publish(node.port, topic, b"seen")
        seen = await stream.event(DELIVERY_TIMEOUT_S)
        assert (seen["event"], seen["data"]) == (topic, "seen"), seen
        await stream.close()
        received = driver.stats()["received"]
        missed = [f"missed {i}" for i in range(REPLAY_MISSED)]
        for i, body in enumerate(missed):
            if via_broker and i % 2:
                await broker.publish(topic, body.encode())
            else:
                await post_publish(node.port, topic, body.encode())
        # Every missed one has reached the node before the browser is back.
        await until_true(lambda: driver.stats()["received"] >= received + len(missed))
        resumed = await SSEStream.open(node.port, url, {"Last-Event-ID": seen["id"]})
        await resumed.config()
        answer = orjson.loads((await resumed.event())["data"])
        assert answer == {"replay": {"last_event_id": seen["id"], "recovered": True}}
        replayed = [await next_data(resumed, topic) for _ in missed]
        assert (replayed if ordered else sorted(replayed)) == missed
        await post_publish(node.port, topic, b"live")
        assert await next_data(resumed, topic) == "live"
        await resumed.no_frame(0.3)  # each exactly once
        await resumed.close()


async def until_true(probe: Callable[[], bool], timeout: float = DELIVERY_TIMEOUT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def until(probe: Callable[[], Awaitable[bool]], want: bool, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await probe() != want:
        assert loop.time() < deadline, f"broker subscription state never became {want}"
        await asyncio.sleep(0.1)


__all__ = [
    "Broker",
    "check_broker_restart",
    "check_relay",
    "check_replay_on_the_same_node",
    "check_subscription_lifecycle",
    "nodes",
    "process_node",
]


# -- replay across nodes (test_*_replay.py) --------------------------------


@contextlib.asynccontextmanager
async def serving(driver: str, options: dict[str, Any]) -> AsyncIterator[Server]:
    """A gochan node in this process on ``driver`` with ``options``."""
    streamer = Streamer(Config(port=0, driver=driver, driver_options=options))
    await streamer.start()
    try:
        yield await streamer.serve()
    finally:
        await streamer.close()


async def open_replay_stream(port: int, last_id: str = "") -> SSEStream:
    """A plain EventSource("/events?topic=t1&topic=t2") reconnecting: no
    client id in its URL, so any node can take it."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    stream = await SSEStream.open(port, "/events?topic=t1&topic=t2", headers)
    assert (await stream.config())["subscriptions"] == ["t1", "t2"]
    return stream


async def replay_answer(stream: SSEStream) -> dict[str, Any]:
    """The ``replay`` system frame's payload, next on ``stream``."""
    event = await stream.event()
    answer: dict[str, Any] = orjson.loads(event["data"])["replay"]
    return answer
