"""The uvloop floor: the least a Python server on uvloop can do per connect.

One asyncio Protocol and nothing else: no HTTP parser, no router, no client,
no hub. A read that starts with ``GET /events`` is answered with a fixed SSE
head and a first frame carrying a fresh random id; every other read is
ignored. It cannot publish and is no peer: bench/connect.py runs it beside
gochan and the C reference server to show what of gochan's connect time is
uvloop's (accept, transport, protocol, callbacks) and what is gochan's own.

Run: python bench/peers/uvloop_floor.py --port 8003
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os

import uvloop

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


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8003)
    args = p.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
