"""Self-test of sse_loadgen's parsers against a deliberately awkward SSE server.

The fake server (stdlib asyncio, 127.0.0.1, port 0) varies, per connection:
close-delimited or chunked bodies (tiny chunks, chunk extensions, trailers are not
used since the stream never ends), LF / CRLF / CR line ends, comments, `retry:` and
`id:` fields, heartbeats between frames, and writes split at random byte offsets
with pauses so frames straddle reads. Publish responses alternate between
Content-Length and chunked bodies. Every published message must be counted exactly
once by the load generator, with a sane latency.

Run: python bench/loadgen/selftest.py   (exits non-zero on failure; about 10 s)
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "sse_loadgen.c"
BINARY = HERE / "build" / "sse_loadgen"

CONNECTIONS = 60
TOPICS = 20
PER_CONN = 3
RATE = 100
DURATION_S = 2.0
TIMEOUT_S = 60.0
LINE_ENDS = ("\n", "\r\n", "\r")


class FakeHub:
    def __init__(self) -> None:
        self.subs: dict[str, list[asyncio.Queue[str]]] = {}
        self.next_id = 0
        self.rng = random.Random(1234)
        self.responses = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                url = urlsplit(target)
                query = parse_qs(url.query)
                if method == "GET" and url.path == "/events":
                    await self.stream(query.get("topic", []), writer)
                    return
                if method == "POST" and url.path == "/publish":
                    self.publish(query["topic"][0], body.decode())
                    self.responses += 1
                    if self.responses % 2:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    else:
                        writer.write(
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"1\r\no\r\n1;x=y\r\nk\r\n0\r\n\r\n"
                        )
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def shutdown(self) -> None:
        for queues in self.subs.values():
            for queue in queues:
                queue.put_nowait("")

    def publish(self, topic: str, data: str) -> None:
        self.next_id += 1
        for queue in self.subs.get(topic, []):
            queue.put_nowait(f"{self.next_id}\0{topic}\0{data}")

    async def stream(self, topics: list[str], writer: asyncio.StreamWriter) -> None:
        mode = self.rng.randrange(6)
        chunked = mode >= 3
        eol = LINE_ENDS[mode % 3]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for topic in topics:
            self.subs.setdefault(topic, []).append(queue)
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n"
        writer.write(head.encode())
        first = f"retry: 1000{eol}event: message{eol}data: {json.dumps({'s': topics})}{eol}{eol}"
        await self.send(writer, first, chunked)
        while True:
            item = await queue.get()
            if not item:  # shutdown
                return
            event_id, topic, data = item.split("\0", 2)
            frame = ""
            if self.rng.random() < 0.3:
                frame += f":{eol}{eol}"  # heartbeat
            frame += f": comment{eol}event: {topic}{eol}id: {event_id}{eol}data: {data}{eol}{eol}"
            await self.send(writer, frame, chunked)

    async def send(self, writer: asyncio.StreamWriter, text: str, chunked: bool) -> None:
        data = text.encode()
        pieces: list[bytes] = []
        while data:
            cut = self.rng.randint(1, 9)
            pieces.append(data[:cut])
            data = data[cut:]
        for piece in pieces:
            if chunked:
                ext = ";e=1" if self.rng.random() < 0.3 else ""
                piece = f"{len(piece):x}{ext}\r\n".encode() + piece + b"\r\n"
            # Split the wire bytes again at a random point, pausing between halves.
            cut = self.rng.randint(0, len(piece))
            writer.write(piece[:cut])
            await writer.drain()
            if self.rng.random() < 0.2:
                await asyncio.sleep(0.0005)
            writer.write(piece[cut:])
            await writer.drain()


def build() -> None:
    BINARY.parent.mkdir(exist_ok=True)
    cmd = ["cc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o", str(BINARY)]
    subprocess.run([*cmd, str(SOURCE)], check=True, timeout=120)


async def main() -> int:
    build()
    hub = FakeHub()
    server = await asyncio.start_server(hub.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cmd = [
        str(BINARY),
        "--port",
        str(port),
        "--connections",
        str(CONNECTIONS),
        "--topics",
        str(TOPICS),
        "--per-conn-topics",
        str(PER_CONN),
        "--concurrency",
        "10",
        "--rates",
        f"{RATE},{RATE}",
        "--warmup",
        "0.5",
        "--duration",
        str(DURATION_S),
        "--drain",
        "5",
        "--max-runtime",
        str(TIMEOUT_S),
    ]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT_S + 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        hub.shutdown()
        server.close()
        await asyncio.sleep(0.2)
    records = [json.loads(line) for line in out.decode().splitlines()]
    failures: list[str] = []
    connect = records[0]
    if connect["ready"] != CONNECTIONS:
        failures.append(f"ready {connect['ready']} != {CONNECTIONS}")
    steps = [r for r in records if r["type"] == "step"]
    if len(steps) != 2:
        failures.append(f"{len(steps)} steps")
    for step in steps:
        print(
            f"step: published {step['published']} expected {step['expected']} "
            f"received {step['received']} p50 {step['latency_us']['p50']} us "
            f"p99 {step['latency_us']['p99']} us non2xx {step['pub_non2xx']}"
        )
        if step["received"] != step["expected"] or step["expected"] == 0:
            failures.append(f"received {step['received']} != expected {step['expected']}")
        if step["published"] < 0.9 * RATE * DURATION_S:
            failures.append(f"published only {step['published']}")
        if step["pub_non2xx"] or step["pub_errors"] or step["disconnects"]:
            failures.append("publisher or subscriber errors")
        if not 0 < step["latency_us"]["p50"] < 5_000_000:
            failures.append(f"implausible p50 {step['latency_us']['p50']}")
    exit_record = records[-1]
    if exit_record["type"] != "exit" or exit_record["system_events"] != CONNECTIONS:
        failures.append(f"bad exit record {exit_record}")
    if proc.returncode != 0:
        failures.append(f"exit code {proc.returncode}")
    for failure in failures:
        print("FAIL:", failure)
    print("selftest:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
