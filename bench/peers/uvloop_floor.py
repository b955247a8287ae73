"""The uvloop floor: the least a Python server on uvloop can do per connect.

One asyncio Protocol and nothing else: no HTTP parser, no router, no client,
no hub. A read that starts with ``GET /events`` is answered with a fixed SSE
head and a first frame carrying a fresh random id; every other read is
ignored. It cannot publish and is no peer: bench/connect.py runs it beside
gochan and the C reference server to show what of gochan's connect time is
uvloop's (accept, transport, protocol, callbacks) and what is gochan's own.

With ``--core`` (``core-floor`` in bench/connect.py) it also does the least
gochan's fan-out core needs per connect: the topics are cut out of the
request line, and a :class:`~gochan._fast.Subscriber` of gochan's Cython hub
is subscribed to them and sends the head. No validation, no limits, no
client, no router: what remains of gochan's connect if all of that cost
nothing.

Run: python bench/peers/uvloop_floor.py --port 8003 [--core]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gochan._fast import Hub, Subscriber

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Connection: keep-alive\r\n\r\n"
)


class Floor(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"GET /events"):
            client_id = base64.urlsafe_b64encode(os.urandom(18))
            frame = b'event: message\ndata: {"client_id":"%s"}\n\n' % client_id
            self.transport.write(HEAD + frame)  # type: ignore[attr-defined]


class CoreFloor(asyncio.Protocol):
    __slots__ = ("hub", "subscriber", "transport")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subscriber: Subscriber | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data.startswith(b"GET /stats "):  # what the hub holds, for the test
            body = b'{"topics":%d,"streams":%d}' % (
                self.hub.topic_count,
                self.hub.connection_count,
            )
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            return
        if self.subscriber is not None or not data.startswith(b"GET /events?"):
            return
        target = data[12 : data.index(b" ", 12)].decode("latin-1")
        topics = [part[6:] for part in target.split("&") if part.startswith("topic=")]
        client_id = base64.urlsafe_b64encode(os.urandom(18))
        sub = self.subscriber = Subscriber(self.hub, self.transport)  # type: ignore[arg-type]
        self.hub.subscribe_all(sub, topics)
        sub.send_first(HEAD + b'event: message\ndata: {"client_id":"%s"}\n\n' % client_id)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.subscriber is not None:
            self.hub.close(self.subscriber)


async def serve(host: str, port: int, core: bool) -> None:
    loop = asyncio.get_running_loop()
    if core:
        hub = Hub(loop)
        server = await loop.create_server(lambda: CoreFloor(hub), host, port, backlog=4096)
    else:
        server = await loop.create_server(Floor, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8003)
    p.add_argument("--core", action="store_true", help="subscribe through gochan's hub")
    args = p.parse_args()
    uvloop.run(serve(args.host, args.port, args.core))


if __name__ == "__main__":
    main()
