"""What a stranger can do to the HTTP side: unread pipelines, oversized
updates, ``Expect: 100-continue`` out of turn, bad escapes and keys, and one
address locking every other out. Each test failed on the server before its
fix (issue 10, items 1, 4, 9, 10 and 11)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path

import httpx
import orjson

from gochan import Config
from gochan.config import FD_RESERVE, default_max_connections, fd_limit
from tests.support import SSEStream, raw_request, running, wait_for

from ._proc import server_process

# Memory a connection may make the server hold by never reading answers:
# the transport's high-water mark (64 KiB), one answer past it, the kept
# input (one read) and the parsed pipeline, with room for the allocator.
UNREAD_PIPELINE_BOUND = 8 * 1024 * 1024


def _stuff(sock: socket.socket, data: bytes, seconds: float) -> int:
    """Write as much of ``data`` as the server takes within ``seconds``."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed (EOF or reset) the unread socket."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 20):
            pass  # the answers it never read; then the close
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_unread_pipelined_answers_hold_bounded_memory_and_are_dropped(tmp_path: Path) -> None:
    request = b"GET /gochan.js HTTP/1.1\r\nHost: x\r\n\r\n"
    flags = ("--keepalive-timeout", "1", "--header-timeout", "1")
    with server_process(tmp_path, *flags) as server:
        baseline = server.rss_bytes()
        socks = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            socks.append(sock)
        sent = [_stuff(sock, request * 20_000, 2.0) for sock in socks]
        time.sleep(0.5)
        grown = server.rss_bytes() - baseline
        assert grown < 4 * UNREAD_PIPELINE_BOUND, (grown, sent)
        print(f"4 unread pipelines: {sum(sent)} bytes sent, RSS grew {grown / 2**20:.1f} MiB")
        # Past the timeouts the server drops them, though they never read
        # (the /metrics request itself is the one connection left).
        deadline = time.monotonic() + 10
        while server.metric("gochan_connections") > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.metric("gochan_connections") == 1
        assert all(_closed_by_server(sock, 10.0) for sock in socks)
        for sock in socks:
            sock.close()


async def test_topic_count_is_checked_before_any_topic_is_validated() -> None:
    async with running(max_url_bytes=65536) as server, httpx.AsyncClient() as http:
        stream = await SSEStream.open(server.port, "/events")
        client_id = (await stream.config())["config"]["client_id"]
        await stream.close()
        # 100,000 topics, the last one invalid: the limit answers, not the
        # validation of every topic (which stalled the loop for ~300 ms).
        topics = [f"t{i}" for i in range(99_999)] + ["message"]
        body = orjson.dumps({"client_id": client_id, "add": topics})
        r = await http.post(f"http://127.0.0.1:{server.port}/update_subscriptions", content=body)
        assert r.status_code == 400 and "at most 1024 topics" in r.text, r.text
        query = "&".join(f"topic=q{i}" for i in range(1_050)) + "&topic=message"
        r = await http.get(f"http://127.0.0.1:{server.port}/events?{query}")
        assert r.status_code == 400 and "at most 1024 topics" in r.text, r.text


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split()[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return status, await reader.readexactly(length)


async def test_100_continue_comes_after_the_answers_before_it() -> None:
    async with running() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"POST /publish?topic=a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert await _read_response(reader) == (200, b"ok\n")
        status, _ = await _read_response(reader)
        assert status == 100
        writer.write(b"hi")
        status, body = await _read_response(reader)
        assert status == 200 and b'"id"' in body
        writer.close()


async def test_100_continue_is_not_sent_to_a_request_that_will_be_refused() -> None:
    async with running(publish_key="s3cret") as server:
        head = (
            b"POST /publish?topic=a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = await raw_request(server.port, head, read_timeout=2)
        assert answer.startswith(b"HTTP/1.1 401"), answer
        assert b"100 Continue" not in answer
        answer = await raw_request(server.port, head.replace(b"/publish", b"/nowhere"), 2)
        assert answer.startswith(b"HTTP/1.1 404") and b"100 Continue" not in answer


async def test_a_non_ascii_publish_key_is_compared_as_utf8() -> None:
    async with running(publish_key="clé-ключ") as server:
        head = b"POST /publish?topic=a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\n"
        key = "Authorization: Bearer clé-ключ\r\n".encode()
        answer = await raw_request(server.port, head + key + b"Connection: close\r\n\r\nx")
        assert answer.startswith(b"HTTP/1.1 200"), answer
        latin1 = "Authorization: Bearer clé-ключ\r\n".encode().decode("latin-1")
        wrong = latin1.encode("utf-8")  # the key mangled the old way: refused
        answer = await raw_request(server.port, head + wrong + b"Connection: close\r\n\r\nx")
        assert answer.startswith(b"HTTP/1.1 401"), answer


async def test_a_nul_in_a_static_path_is_not_found(tmp_path: Path, caplog: object) -> None:
    (tmp_path / "index.html").write_text("hi")
    async with running(static_dir=str(tmp_path)) as server:
        for target in (b"/%00", b"/a%00b", b"/%FF"):
            answer = await raw_request(
                server.port, b"GET " + target + b" HTTP/1.1\r\nConnection: close\r\n\r\n"
            )
            assert answer.startswith((b"HTTP/1.1 404", b"HTTP/1.1 400")), (target, answer)
        assert server.bad_requests == 0


async def test_invalid_utf8_escapes_are_refused_not_replaced() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{server.port}"
        for escape in ("%FF", "%FE", "%C3%28"):
            r = await http.get(f"{base}/events?topic={escape}")
            assert r.status_code == 400 and "UTF-8" in r.text, r.text
            r = await http.post(f"{base}/publish?topic={escape}", content=b"x")
            assert r.status_code == 400 and "UTF-8" in r.text, r.text
            r = await http.post(
                f"{base}/publish",
                content=f"topic={escape}&data=x".encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 400, r.text
        assert server.streamer.hub.topic_count == 0


def test_max_connections_is_derived_from_the_fd_limit() -> None:
    assert default_max_connections() == min(50_000, fd_limit() - FD_RESERVE)
    assert Config().max_connections == default_max_connections()
    assert Config().peer_connection_limit == Config().max_connections // 10


async def _connect_from(
    port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def test_idle_sockets_from_one_address_do_not_lock_out_the_others() -> None:
    async with running(max_connections=50) as server:
        assert server.config.peer_connection_limit == 5
        idle = [await _connect_from(server.port, "127.0.0.1") for _ in range(5)]
        await wait_for(lambda: server.connections == 5)
        reader, writer = await _connect_from(server.port, "127.0.0.1")
        refused = await asyncio.wait_for(reader.read(), 5)
        assert refused.startswith(b"HTTP/1.1 503") and b"from your address" in refused
        writer.close()
        reader, writer = await _connect_from(server.port, "127.0.0.2")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        for _, w in idle:
            w.close()
        await wait_for(lambda: server.connections == 0)
        assert "gochan_peer_connections_refused_total 1.0" in server.metrics_text()


async def test_anonymous_clients_from_one_address_do_not_fill_max_clients() -> None:
    async with running(max_clients=20, client_ttl=60) as server:
        assert server.config.peer_client_limit == 2

        async def connect(source: str) -> bytes:
            reader, writer = await _connect_from(server.port, source)
            writer.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.close()
            return head

        assert (await connect("127.0.0.1")).startswith(b"HTTP/1.1 200")
        assert (await connect("127.0.0.1")).startswith(b"HTTP/1.1 200")
        third = await connect("127.0.0.1")
        assert third.startswith(b"HTTP/1.1 429") and b"Retry-After: 60" in third
        assert (await connect("127.0.0.2")).startswith(b"HTTP/1.1 200")
        assert server.streamer.count_clients() == 3
        # Its share comes back as its clients go.
        for client in list(server.streamer._clients.values()):
            await server.streamer.remove_client(client)
        assert (await connect("127.0.0.1")).startswith(b"HTTP/1.1 200")


def test_past_the_fd_limit_connections_are_answered(tmp_path: Path) -> None:
    """With the open-file limit at 300, gochan's own limit (300 less the
    reserve) refuses with a 503 before accept() fails and the kernel resets."""
    import resource
    import subprocess
    import sys

    script = (
        "import resource, sys, runpy; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)); "
        "sys.argv = ['gochan', '--port', '0', '--max-connections-per-peer', '1000']; "
        "runpy.run_module('gochan.server', run_name='__main__')"
    )
    del resource  # only the child's limit changes
    log = tmp_path / "err.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        port = int(line.rsplit(b":", 1)[1].split()[0])
        admitted = 300 - FD_RESERVE  # the derived max_connections
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(admitted)]
        time.sleep(0.3)
        for sock in socks:  # admitted and idle: nothing to read yet
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                raise AssertionError(f"an admitted connection got {sock.recv(200)!r}")
        # One at a time, so the server never holds more than one refused
        # socket: each must be answered, not reset.
        answered = 0
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                answer = sock.recv(200)
                answered += answer.startswith(b"HTTP/1.1 503 ")
        for sock in socks:
            sock.close()
        assert answered == 300
        assert b"max_connections 44" in log.read_bytes(), log.read_text()
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


async def test_expect_on_a_preflight_or_a_wrong_method_answers_as_without_it() -> None:
    """Found by the fuzzer: the early refusal must not change the answer."""
    async with running() as server:
        expect = b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        answer = await raw_request(
            server.port, b"OPTIONS /publish HTTP/1.1\r\nHost: localhost\r\n" + expect
        )
        assert answer.startswith(b"HTTP/1.1 204") and b"Allow: POST, OPTIONS" in answer, answer
        answer = await raw_request(
            server.port,
            b"POST /events HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n" + expect,
        )
        assert answer.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD, OPTIONS" in answer


async def test_head_of_the_stream_says_connection_once() -> None:
    async with running() as server:
        for asked, said in ((b"close", b"Connection: close"), (b"keep-alive", None)):
            answer = await raw_request(
                server.port,
                b"HEAD /events HTTP/1.1\r\nHost: localhost\r\nConnection: " + asked + b"\r\n\r\n",
                read_timeout=0.5,
            )
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert answer.lower().count(b"connection:") == (1 if said else 0), answer
            if said:
                assert said in answer
