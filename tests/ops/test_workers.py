"""``--workers 2`` end to end: a real ``python -m gochan.server`` supervisor
and its two worker processes on one port, a real NATS, real HTTP clients.

Which worker serves a connection is in the ``X-Gochan-Worker`` header
workers add to every answer; the kernel picks the worker of each new
connection, so the tests open connections until they have what they need.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gochan import Config
from gochan.config import DEFAULT_WORKERS, load
from gochan.errors import ConfigurationError
from tests.drivers._nats_server import NatsServer, external_url
from tests.drivers.conftest import import_or_skip, port_open
from tests.hardening._proc import ServerProcess, server_process
from tests.support import SSEStream, closing_retry

WORKERS = 2
ATTEMPTS = 64  # fresh connections tried before giving up on landing somewhere
DELIVERY_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 2.0
SUPERVISOR_MARGIN_S = 5.0  # workers.SHUTDOWN_MARGIN_S
_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """GOCHAN_NATS_URL, else the NATS on 127.0.0.1:4222, else one started here."""
    import_or_skip("nats")
    url = external_url()
    if url:
        yield url
    elif port_open("127.0.0.1", 4222):
        yield "nats://127.0.0.1:4222"
    else:
        for server in NatsServer.running():
            yield server.url


@pytest.fixture
def gochan(tmp_path: Path, nats_url: str) -> Iterator[ServerProcess]:
    with server_process(
        tmp_path,
        "--workers", str(WORKERS), "--driver", "nats", f"--nats-url={nats_url}",
        "--shutdown-grace", str(SHUTDOWN_GRACE_S),
    ) as proc:  # fmt: skip
        yield proc


def topic(name: str) -> str:
    return f"workers-{secrets.token_hex(4)}-{name}"


def worker_pids(proc: ServerProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in _STARTED.findall(proc.stderr())}


async def stream_on_each_worker(port: int, target: str) -> dict[int, SSEStream]:
    """One open stream per worker (the others opened on the way are closed)."""
    held: dict[int, SSEStream] = {}
    try:
        for _ in range(ATTEMPTS):
            stream = await SSEStream.open(port, target)
            if stream.status != 200:
                await stream.close()
                raise AssertionError(stream.head)
            worker = int(stream.headers["x-gochan-worker"])
            if worker in held:
                await stream.close()
                continue
            held[worker] = stream
            if len(held) == WORKERS:
                return held
        raise AssertionError(f"no stream landed on every worker in {ATTEMPTS} connections: {held}")
    except BaseException:
        for opened in held.values():  # a caller that tries again must not leak them
            await opened.close()
        raise


async def client_id(stream: SSEStream) -> str:
    config = await stream.config()
    cid: str = config["config"]["client_id"]
    return cid


async def publish(port: int, name: str, body: bytes) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"http://127.0.0.1:{port}/publish", params={"topic": name}, content=body
        )
    assert r.status_code in (200, 202), r.text


async def next_data(stream: SSEStream, name: str) -> str:
    event = await stream.event(DELIVERY_TIMEOUT_S)
    assert event.get("event") == name, event
    return event["data"]


async def handoffs(port: int) -> dict[int, tuple[int, int]]:
    """(sent, adopted) per worker, from each worker's /metrics (read on
    fresh connections until every worker has answered)."""
    seen: dict[int, tuple[int, int]] = {}
    async with httpx.AsyncClient() as http:
        for _ in range(ATTEMPTS):
            # A fresh connection each time, so the kernel picks again.
            r = await http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"})
            worker = int(r.headers["x-gochan-worker"])
            values = dict(re.findall(r"^(gochan_handoffs_\w+_total) (\d+)(?:\.0)?$", r.text, re.M))
            seen[worker] = (
                int(values["gochan_handoffs_sent_total"]),
                int(values["gochan_handoffs_adopted_total"]),
            )
            if len(seen) == WORKERS:
                return seen
    raise AssertionError(f"/metrics did not land on every worker: {seen}")


async def update(
    port: int, cid: str, add: list[str], remove: list[str] | None = None
) -> httpx.Response:
    """POST /update_subscriptions on a fresh connection."""
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"http://127.0.0.1:{port}/update_subscriptions",
            content=orjson.dumps({"client_id": cid, "add": add, "remove": remove or []}),
            headers={"Content-Type": "application/json", "Connection": "close"},
        )


def test_workers_setting() -> None:
    assert Config().workers == DEFAULT_WORKERS == 1
    config, sources = load(env={"GOCHAN_WORKERS": "3", "GOCHAN_DRIVER": "nats"})
    assert config.workers == 3 and sources["workers"] == "env GOCHAN_WORKERS"
    config, sources = load(flags={"workers": "2", "driver": "nats"})
    assert config.workers == 2 and sources["workers"] == "flag --workers"
    with pytest.raises(ConfigurationError, match=r"workers: expected an integer >= 1"):
        Config(workers=0)
    with pytest.raises(ConfigurationError, match="workers: 2 processes cannot share the mem"):
        Config(workers=2)


def test_mem_driver_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--workers", "2", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("gochan: workers:") and "mem" in lines[0], lines
    assert done.stdout == ""


def test_port_in_use_refused() -> None:
    import_or_skip("nats")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        done = subprocess.run(
            [sys.executable, "-m", "gochan.server", "--workers", "2", "--driver", "nats",
             "--port", str(taken.getsockname()[1])],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Address already in use" in lines[0], done.stderr


def test_worker_that_cannot_start_stops_the_supervisor() -> None:
    import_or_skip("nats")
    with socket.create_server(("127.0.0.1", 0)) as nothing:  # no broker here
        url = f"nats://127.0.0.1:{nothing.getsockname()[1]}"
        nothing.close()
        done = subprocess.run(
            [sys.executable, "-m", "gochan.server", "--workers", "2", "--driver", "nats",
             f"--nats-url={url}", "--port", "0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done
    assert re.search(r"worker \d \(pid \d+\) failed to start \(exit code 1\)", done.stderr)
    assert "listening" not in done.stdout


async def test_one_publish_reaches_streams_on_both_workers(gochan: ServerProcess) -> None:
    name = topic("fan")
    streams = await stream_on_each_worker(gochan.port, f"/events?topic={name}")
    try:
        ids = {w: await client_id(s) for w, s in streams.items()}
        assert {w: cid.split(".")[0] for w, cid in ids.items()} == {0: "w0", 1: "w1"}
        await publish(gochan.port, name, b"to every worker")
        for stream in streams.values():
            assert await next_data(stream, name) == "to every worker"
    finally:
        for stream in streams.values():
            await stream.close()


async def test_update_subscriptions_reaches_the_owner_from_any_worker(
    gochan: ServerProcess,
) -> None:
    streams = await stream_on_each_worker(gochan.port, "/events")
    try:
        ids = {w: await client_id(s) for w, s in streams.items()}
        before = await handoffs(gochan.port)
        added: dict[int, list[str]] = {w: [] for w in ids}
        # Fresh connections until some landed on the other worker than the
        # client's, for clients of both workers (see the hand-off counters).
        for round_ in range(ATTEMPTS // 4):
            for worker, cid in ids.items():
                name = topic(f"u{worker}-{round_}")
                r = await update(gochan.port, cid, [name])
                assert r.status_code == 200, r.text
                assert r.headers["x-gochan-worker"] == str(worker)  # answered by the owner
                body = r.json()
                assert body["client_id"] == cid and body["errors"] == []
                added[worker].append(name)
                assert body["subscriptions"] == added[worker]
            after = await handoffs(gochan.port)
            if all(after[w][1] > before[w][1] for w in ids):
                break  # each worker has adopted one for its client
        else:
            raise AssertionError(f"no update landed on the other worker: {before} {after}")
        assert sum(a[0] for a in after.values()) - sum(b[0] for b in before.values()) == sum(
            a[1] for a in after.values()
        ) - sum(b[1] for b in before.values())
        # The updates took effect on the streams themselves.
        for worker, stream in streams.items():
            last = added[worker][-1]
            await publish(gochan.port, last, b"after the update")
            assert await next_data(stream, last) == "after the update"
        r = await update(gochan.port, ids[0], [], added[0])
        assert r.status_code == 200 and r.json()["subscriptions"] == []
    finally:
        for stream in streams.values():
            await stream.close()


async def test_reconnect_with_id_lands_on_the_owner(gochan: ServerProcess) -> None:
    name = topic("re")
    streams = await stream_on_each_worker(gochan.port, f"/events?topic={name}")
    ids = {w: await client_id(s) for w, s in streams.items()}
    for stream in streams.values():
        await stream.close()
    reopened: list[SSEStream] = []
    try:
        for _ in range(4):
            for worker, cid in ids.items():
                stream = await SSEStream.open(gochan.port, f"/events?id={cid}")
                reopened.append(stream)
                assert stream.status == 200, stream.head
                assert stream.headers["x-gochan-worker"] == str(worker)
                config = await stream.config()
                assert config["config"]["client_id"] == cid
                assert config["subscriptions"] == [name]
        adopted = sum(a for _s, a in (await handoffs(gochan.port)).values())
        assert adopted > 0  # some reconnects landed on the other worker
        # Passed streams stay up: each stream gets the next message.
        await publish(gochan.port, name, b"live after reconnect")
        for stream in reopened:
            assert await next_data(stream, name) == "live after reconnect"
        # An id no worker holds is refused as unknown wherever it lands.
        for tag in ("w0", "w1", "w7"):
            stream = await SSEStream.open(gochan.port, f"/events?id={tag}.{secrets.token_hex(8)}")
            assert stream.status == 401, stream.head
            assert await stream.body() == b"Invalid client ID\n"
            await stream.close()
    finally:
        for stream in reopened:
            await stream.close()


async def test_keep_alive_connection_passed_and_pipelined_refused(gochan: ServerProcess) -> None:
    streams = await stream_on_each_worker(gochan.port, "/events")
    try:
        ids = {w: await client_id(s) for w, s in streams.items()}
        reader, writer = await asyncio.open_connection("127.0.0.1", gochan.port)
        health = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        writer.write(health)
        head = await reader.readuntil(b"\r\n\r\n")
        here = int(re.search(rb"X-Gochan-Worker: (\d+)", head).group(1))  # type: ignore[union-attr]
        await reader.readexactly(3)  # "ok\n"
        other = 1 - here
        body = orjson.dumps({"client_id": ids[other], "add": [topic("k")]})
        post = (
            b"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        # Pipelined behind another request: refused, the one before answered.
        writer.write(health + post)
        answer = await asyncio.wait_for(reader.read(), DELIVERY_TIMEOUT_S)
        first, _, rest = answer.partition(b"ok\n")
        assert first.startswith(b"HTTP/1.1 200 "), answer
        assert rest.startswith(b"HTTP/1.1 503 "), answer
        assert b"another worker" in rest and b"Connection: close" in rest
        writer.close()
        # Alone on a keep-alive connection: passed, answered by the owner,
        # and the connection stays with the owner.
        for _ in range(ATTEMPTS):
            reader, writer = await asyncio.open_connection("127.0.0.1", gochan.port)
            writer.write(health)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(3)
            if int(re.search(rb"X-Gochan-Worker: (\d+)", head).group(1)) == here:  # type: ignore[union-attr]
                break
            writer.close()
        else:
            raise AssertionError("no connection landed on the same worker again")
        for _ in range(2):
            writer.write(post)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"X-Gochan-Worker: %d" % other in head
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            assert orjson.loads(await reader.readexactly(length))["client_id"] == ids[other]
        writer.close()
    finally:
        for stream in streams.values():
            await stream.close()


async def passed_to_worker_1(port: int, cid: str) -> None:
    """Updates for worker 1's client ``cid`` on fresh connections, until
    worker 0 has passed one on; each answered by worker 1."""
    sent = (await handoffs(port))[0][0]
    for _ in range(ATTEMPTS):
        r = await update(port, cid, [topic("p")])
        assert r.status_code == 200 and r.headers["x-gochan-worker"] == "1", r.text
        if (await handoffs(port))[0][0] > sent:
            return
    raise AssertionError("no update for worker 1's client landed on worker 0")


async def test_killed_worker_is_restarted(gochan: ServerProcess) -> None:
    pids = worker_pids(gochan)
    assert sorted(pids) == [0, 1]
    # Worker 0 holds a hand-off connection to this worker 1 ...
    streams = await stream_on_each_worker(gochan.port, "/events")
    await passed_to_worker_1(gochan.port, await client_id(streams[1]))
    for stream in streams.values():
        await stream.close()
    os.kill(pids[1], signal.SIGKILL)
    died = re.compile(rf"worker 1 \(pid {pids[1]}\) died \(signal SIGKILL\); restarting")
    for _ in range(200):
        if died.search(gochan.stderr()) and worker_pids(gochan)[1] != pids[1]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(gochan.stderr())
    assert worker_pids(gochan)[0] == pids[0]  # the other one was left alone
    name = topic("back")
    # The new worker 1 serves: streams land on both again, and get messages.
    for _ in range(100):
        try:
            streams = await stream_on_each_worker(gochan.port, f"/events?topic={name}")
            break
        except AssertionError:  # the new worker 1 is still starting
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the restarted worker serves no stream")
    try:
        ids = {w: await client_id(s) for w, s in streams.items()}
        assert {w: cid.split(".")[0] for w, cid in ids.items()} == {0: "w0", 1: "w1"}
        await publish(gochan.port, name, b"after the restart")
        for stream in streams.values():
            assert await next_data(stream, name) == "after the restart"
        # ... and passes connections to the new one.
        await passed_to_worker_1(gochan.port, ids[1])
    finally:
        for stream in streams.values():
            await stream.close()
    assert gochan.proc.poll() is None


async def test_sigterm_stops_every_worker(gochan: ServerProcess) -> None:
    streams = await stream_on_each_worker(gochan.port, "/events")
    pids = worker_pids(gochan)
    try:
        for stream in streams.values():
            await client_id(stream)
        gochan.proc.send_signal(signal.SIGTERM)
        for stream in streams.values():
            closing_retry(await stream.closing(SHUTDOWN_GRACE_S + SUPERVISOR_MARGIN_S))
        code = await asyncio.to_thread(gochan.proc.wait, SHUTDOWN_GRACE_S + SUPERVISOR_MARGIN_S)
        assert code == 0, gochan.stderr()
        for pid in pids.values():  # reaped by the supervisor before it exited
            assert not Path(f"/proc/{pid}").exists()
        assert "stopping 2 workers (SIGTERM)" in gochan.stderr()
    finally:
        for stream in streams.values():
            await stream.close()


async def test_half_closed_request_is_answered_by_the_owner(gochan: ServerProcess) -> None:
    """A client that sends its request and then shuts its side (EOF) still
    gets its answer when the connection is passed on."""
    streams = await stream_on_each_worker(gochan.port, "/events")
    try:
        ids = {w: await client_id(s) for w, s in streams.items()}
        before = sum(a for _s, a in (await handoffs(gochan.port)).values())
        for round_ in range(ATTEMPTS // 4):
            for worker, cid in ids.items():
                body = orjson.dumps({"client_id": cid, "add": [topic(f"h{round_}")]})
                reader, writer = await asyncio.open_connection("127.0.0.1", gochan.port)
                writer.write(
                    b"POST /update_subscriptions HTTP/1.1\r\nHost: localhost\r\n"
                    b"Connection: close\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(body) + body
                )
                writer.write_eof()
                answer = await asyncio.wait_for(reader.read(), DELIVERY_TIMEOUT_S)
                writer.close()
                assert answer.startswith(b"HTTP/1.1 200 "), answer
                assert b"X-Gochan-Worker: %d\r\n" % worker in answer
            if sum(a for _s, a in (await handoffs(gochan.port)).values()) > before:
                break
        else:
            raise AssertionError("no half-closed request landed on the other worker")
    finally:
        for stream in streams.values():
            await stream.close()


async def test_second_signal_kills_the_workers(gochan: ServerProcess) -> None:
    streams = await stream_on_each_worker(gochan.port, "/events")
    pids = worker_pids(gochan)
    try:
        # Two different signals: a second SIGTERM still pending would merge
        # with the first.
        gochan.proc.send_signal(signal.SIGTERM)
        gochan.proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(gochan.proc.wait, SHUTDOWN_GRACE_S + SUPERVISOR_MARGIN_S)
        assert code == 1, gochan.stderr()
        assert "second signal: killing the workers" in gochan.stderr()
        for pid in pids.values():
            assert not Path(f"/proc/{pid}").exists()
    finally:
        for stream in streams.values():
            await stream.close()
