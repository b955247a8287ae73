"""gochan cluster nodes as their own processes (``python -m gochan.server
--cluster``), on free loopback ports, and what the tests do with them:
publish, read streams to the end, and check nothing was lost or repeated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from ..support import SSEStream, free_port, parse_frame

PUBLISH_KEY = "cluster-test-key"
START_TIMEOUT_S = 15.0
LOG_TAIL_CHARS = 3000


def cluster_name() -> str:
    """A cluster of its own: keys and channels no other test shares."""
    return "t" + uuid.uuid4().hex[:12]


class Node:
    """One gochan process of a cluster."""

    def __init__(self, node_id: str, args: Sequence[str], log_dir: Path) -> None:
        self.node_id = node_id
        self.port = free_port()
        self.log_path = log_dir / f"{node_id}.log"
        self.args = [
            sys.executable, "-m", "gochan.server",
            "--port", str(self.port),
            "--node-id", node_id,
            "--publish-key", PUBLISH_KEY,
            "--connection-rate-per-peer", "0",
            "--log-level", "warning",
            *args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "<no log>"

    async def ready(self, http: httpx.AsyncClient, peers: Sequence[str] = ()) -> str:
        """Wait until /readyz answers 200 and names every one of ``peers``
        among the nodes it hears; its body."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        body = ""
        while loop.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                answer = await http.get(self.url("/readyz"))
                body = answer.text
                heard = body.rpartition("nodes ")[2].split()
                if answer.status_code == 200 and all(p in heard for p in peers):
                    return body
            await asyncio.sleep(0.05)
        raise RuntimeError(f"node {self.node_id} not ready ({body!r}):\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def cluster(
    node_ids: Sequence[str], args: Sequence[str]
) -> AsyncIterator[tuple[list[Node], httpx.AsyncClient]]:
    """Started nodes that all hear each other, and an HTTP client; every
    node stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="gochan-cluster-") as tmp:
        nodes = [Node(n, args, Path(tmp)) for n in node_ids]
        async with httpx.AsyncClient(timeout=10.0) as http:
            try:
                for node in nodes:
                    node.start()
                await asyncio.gather(*(n.ready(http, node_ids) for n in nodes))
                yield nodes, http
            finally:
                for node in nodes:
                    node.stop()


async def publish(http: httpx.AsyncClient, node: Node, topic: str, data: str) -> str:
    """Publish over HTTP on ``node``; the event id."""
    answer = await http.post(
        node.url(f"/publish?topic={topic}"),
        content=data.encode(),
        headers={"Authorization": f"Bearer {PUBLISH_KEY}"},
    )
    assert answer.status_code == 200, (answer.status_code, answer.text)
    event_id: str = answer.json()["id"]
    return event_id


async def update(
    http: httpx.AsyncClient, node: Node, client_id: str, add: Sequence[str] = (),
    remove: Sequence[str] = (),
) -> httpx.Response:  # fmt: skip
    return await http.post(
        node.url("/update_subscriptions"),
        json={"client_id": client_id, "add": list(add), "remove": list(remove)},
    )


async def read_until(stream: SSEStream, want: int, timeout: float = 10.0) -> list[dict[str, str]]:
    """Message frames (system frames left out) until ``want`` have come."""
    got: list[dict[str, str]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < want:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"{len(got)} of {want} messages came: {got[-3:]}")
        frame = await stream.event(timeout=left)
        if frame.get("event") != "message":
            got.append(frame)
    return got


async def read_to_end(stream: SSEStream, timeout: float = 10.0) -> list[dict[str, str]]:
    """Message frames until the stream ends (its node died)."""
    got: list[dict[str, str]] = []
    with contextlib.suppress(EOFError, ConnectionError, asyncio.IncompleteReadError):
        while True:
            raw = await stream.frame(timeout)
            if raw.startswith(b":"):
                continue
            frame = parse_frame(raw)
            if frame.get("event") != "message":
                got.append(frame)
    return got


def check_exactly_once(frames: list[dict[str, str]], sent: dict[str, list[str]]) -> None:
    """Every message of ``sent`` (topic -> bodies in publish order) came
    once, in order per topic, and nothing else came."""
    seen: dict[str, list[str]] = {}
    for frame in frames:
        seen.setdefault(frame["event"], []).append(frame["data"])
    assert seen == sent, {t: (len(seen.get(t, [])), len(bodies)) for t, bodies in sent.items()}


async def kill_and_resume(
    http: httpx.AsyncClient,
    stream: SSEStream,
    client_id: str,
    holder: Node,
    publishers: Sequence[Node],
    resume_on: Node,
    sent: dict[str, list[str]],
    before: Sequence[dict[str, str]] = (),
) -> SSEStream:
    """With a publisher running (``<topic>-<n>`` on the topics of ``sent``
    in turn, through ``publishers`` in turn), SIGKILL ``holder`` mid-stream,
    resume the client on ``resume_on`` with the last id it got, and check
    that what came before and after holds every message once, in order.
    ``before``: what the stream had already received of ``sent``. Returns
    the resumed stream."""
    topics = list(sent)
    stop = asyncio.Event()

    async def publisher() -> None:
        n = 0
        while not stop.is_set():
            topic = topics[n % len(topics)]
            body = f"{topic}-{n}"
            await publish(http, publishers[n % len(publishers)], topic, body)
            sent[topic].append(body)
            n += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(publisher())
    try:
        got = [*before, *await read_until(stream, 20)]
        holder.kill()  # SIGKILL, mid-stream, with the publisher running
        got += await read_to_end(stream, timeout=5.0)
        await stream.close()
        last_id = got[-1]["id"]
        await asyncio.sleep(0.3)  # messages go on while the browser is away
        again = await SSEStream.open(
            resume_on.port, f"/events?id={client_id}", {"Last-Event-ID": last_id}
        )
        assert again.status == 200
        assert (await again.config())["subscriptions"] == topics
    finally:
        stop.set()
        await task
    total = sum(len(bodies) for bodies in sent.values())
    after = await read_until(again, total - len(got), timeout=15.0)
    check_exactly_once(got + after, sent)
    return again
