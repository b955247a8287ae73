"""Helpers shared by the tests: a real server on a free port, a raw-socket
SSE reader that sees the exact bytes on the wire, small waits, a loop in a
thread (for hypothesis with blocking sockets) and what httptools reads of a
request (the oracle of the fast paths' parsers)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

import httptools
import orjson
import uvloop

from gochan import Config, Streamer
from gochan.server import Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running(**options: Any) -> AsyncIterator[Server]:
    """A started Streamer serving on 127.0.0.1 and a free port."""
    config = Config(**{"port": 0, **options})
    streamer = Streamer(config)
    await streamer.start()
    server = await streamer.serve()
    try:
        yield server
    finally:
        await streamer.close()


class SSEStream:
    """A raw HTTP/1.1 client for GET /events that keeps the exact bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.head = b""
        self.headers: dict[str, str] = {}
        self.buffer = b""

    @classmethod
    async def open(
        cls, port: int, target: str = "/events", headers: dict[str, str] | None = None
    ) -> SSEStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"GET {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode())
        stream = cls(reader, writer)
        stream.head = await reader.readuntil(b"\r\n\r\n")
        lines = stream.head.decode("latin-1").split("\r\n")
        stream.status = int(lines[0].split()[1])
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                stream.headers[name.strip().lower()] = value.strip()
        return stream

    async def body(self) -> bytes:
        """The rest of a non-stream response (Content-Length bodies)."""
        length = int(self.headers.get("content-length", "0"))
        return await self.reader.readexactly(length)

    async def frame(self, timeout: float = 5.0) -> bytes:
        """The next frame, raw, including its blank line."""
        while b"\n\n" not in self.buffer:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                raise EOFError(f"stream ended; unparsed: {self.buffer!r}")
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(b"\n\n")
        return frame + b"\n\n"

    async def closing(self, timeout: float = 5.0) -> bytes:
        """The next two frames, raw: at shutdown, the ``shutdown`` frame and
        ``Client closed`` (see :func:`closing_retry`)."""
        first = await self.frame(timeout)
        return first + await self.frame(timeout)

    async def event(self, timeout: float = 5.0, skip_heartbeats: bool = True) -> dict[str, str]:
        """The next frame parsed into fields (data lines joined with \\n)."""
        while True:
            raw = await self.frame(timeout)
            if skip_heartbeats and raw.startswith(b":"):
                continue
            return parse_frame(raw)

    async def config(self) -> dict[str, Any]:
        first = await self.event()
        assert first["event"] == "message"
        data: dict[str, Any] = orjson.loads(first["data"])
        return data

    async def no_frame(self, wait: float = 0.3) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            frame = await self.frame(wait)
            raise AssertionError(f"unexpected frame {frame!r}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


SHUTDOWN_FRAMES = re.compile(
    rb'event: message\ndata: \{"shutdown":\{"retry_ms":(\d+)\}\}\n\n'
    rb"retry: (\d+)\nevent: message\ndata: Client closed\n\n"
)


def closing_retry(frames: bytes, low_ms: int = 1000, high_ms: int = 30_000) -> int:
    """The delay of a shutdown's last two frames (``{"shutdown":{"retry_ms":N}}``,
    then ``Client closed`` with ``retry: N``, the same N), checked to lie in
    [low_ms, high_ms] (the default window). ``frames``: both, as
    :meth:`SSEStream.closing` reads them (or ``Streamer.closing_frame()``)."""
    found = SHUTDOWN_FRAMES.fullmatch(frames)
    assert found is not None, frames
    retry = int(found.group(2))
    assert int(found.group(1)) == retry, frames
    assert low_ms <= retry <= high_ms, retry
    return retry


def parse_frame(raw: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in raw.decode().split("\n"):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
    if data:
        fields["data"] = "\n".join(data)
    return fields


async def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            if not chunk:
                break
            chunks.append(chunk)
    except asyncio.TimeoutError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return b"".join(chunks)


async def wait_for(predicate: Any, timeout: float = 5.0, step: float = 0.01) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)


def send_in_reads(port: int, data: bytes, cuts: list[int]) -> socket.socket:
    """A connection to 127.0.0.1:``port`` that has sent ``data`` in reads
    cut at ``cuts`` (what follows a send the server closed on is dropped),
    for the caller to read the answers from and close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start = 0
    for end in [*cuts, len(data)]:
        try:
            sock.sendall(data[start:end])
        except OSError:
            break  # closed after an error answer
        start = end
        time.sleep(0.002)  # a read of its own
    return sock


# An answer's Date header, blanked to compare two servers' answers.
DATE_HEADER = re.compile(rb"\r\nDate: [^\r]*\r\n")


class LoopInThread:
    """An event loop (uvloop) running in a thread of its own, so a plain
    test (hypothesis) can drive servers on it with blocking sockets."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class HttpReading:
    """What httptools and the slow path's callbacks make of a request."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self.headers.get(key)
        self.headers[key] = text if previous is None else previous + ", " + text

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def httptools_reads(data: bytes) -> tuple[HttpReading, httptools.HttpRequestParser]:
    reading = HttpReading()
    parser = httptools.HttpRequestParser(reading)
    parser.feed_data(data)
    return reading, parser
