"""GET /events end to end over real sockets: headers, first frame, delivery,
several connections per client, TTL, reconnects and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import orjson
import pytest

from gochan import Config, Streamer
from tests.support import SSEStream, closing_retry, parse_frame, running, wait_for

FIRST_HEADERS = {
    "content-type": "text/event-stream",
    "cache-control": "no-cache, no-store, must-revalidate, pre-check=0, post-check=0",
    "connection": "keep-alive",
    "server": "gochan",
    "x-accel-buffering": "no",
}


async def test_stream_headers_and_first_frame() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=a&topic=b")
        assert stream.status == 200
        for name, value in FIRST_HEADERS.items():
            assert stream.headers[name] == value
        assert "content-length" not in stream.headers
        first = await stream.frame()
        client_id = server.streamer.count_clients() and next(iter(server.streamer._clients))
        assert first == (
            b'event: message\ndata: {"config":{"client_id":"%s","client_ttl_millis":60000},'
            b'"subscriptions":["a","b"]}\n\n' % client_id.encode()
        )
        await stream.close()


async def test_publish_is_delivered_with_id_and_multiline_data() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        stream = await SSEStream.open(server.port, "/events?topic=a")
        await stream.config()
        url = f"http://127.0.0.1:{server.port}/publish"
        r = await http.post(url, params={"topic": "a"}, content=b"l1\r\nl2\nl3")
        assert r.status_code == 200
        event_id = r.json()["id"]
        raw = await stream.frame()
        assert raw == b"event: a\nid: %s\ndata: l1\ndata: l2\ndata: l3\n\n" % event_id.encode()
        # Form and JSON publish bodies, like Mercure.
        await http.post(url, data={"topic": "a", "data": "from form"})
        await http.post(url, json={"topic": "a", "data": {"n": 1}})
        assert (await stream.event())["data"] == "from form"
        assert (await stream.event())["data"] == '{"n":1}'
        await stream.close()


async def test_publish_to_zero_one_and_a_thousand_subscribers() -> None:
    # 1000 connections at once from one address: past the default connection rate.
    async with running(connection_rate_per_peer=0) as server, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish"
        r = await http.post(url, params={"topic": "nobody"}, content=b"x")
        assert r.status_code == 200
        one = await SSEStream.open(server.port, "/events?topic=one")
        await one.config()
        await http.post(url, params={"topic": "one"}, content=b"solo")
        assert (await one.event())["data"] == "solo"
        many = await asyncio.gather(
            *(SSEStream.open(server.port, "/events?topic=many") for _ in range(1000))
        )
        await asyncio.gather(*(s.config() for s in many))
        assert server.streamer.hub.subscriber_count("many") == 1000
        r = await http.post(url, params={"topic": "many"}, content=b"fan-out")
        frames = await asyncio.gather(*(s.frame() for s in many))
        expected = b"event: many\nid: %s\ndata: fan-out\n\n" % r.json()["id"].encode()
        assert all(f == expected for f in frames)
        await one.no_frame(0.1)
        await asyncio.gather(*(s.close() for s in [one, *many]))


async def test_several_connections_of_one_client_each_get_every_message() -> None:
    async with running() as server, httpx.AsyncClient() as http:
        first = await SSEStream.open(server.port, "/events?topic=t")
        client_id = (await first.config())["config"]["client_id"]
        others = [await SSEStream.open(server.port, f"/events?id={client_id}") for _ in range(2)]
        for other in others:
            config = await other.config()
            assert config["config"]["client_id"] == client_id
            assert config["subscriptions"] == ["t"]
        for i in range(3):
            await http.post(f"http://127.0.0.1:{server.port}/publish?topic=t", content=b"%d" % i)
        for stream in [first, *others]:
            assert [(await stream.event())["data"] for _ in range(3)] == ["0", "1", "2"]
            await stream.close()


async def test_unknown_and_invalid_client_ids() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?id=doesnotexist")
        assert stream.status == 401
        assert await stream.body() == b"Invalid client ID\n"
        bad = await SSEStream.open(server.port, "/events?id=bad%20id")
        assert bad.status == 400
        topic = await SSEStream.open(server.port, "/events?topic=a%0Ab")
        assert topic.status == 400 and b"control characters" in await topic.body()
        for s in (stream, bad, topic):
            await s.close()
    async with running(auto_create_clients=False) as server:
        stream = await SSEStream.open(server.port, "/events")
        assert stream.status == 401
        await stream.close()


async def test_ttl_expiry_and_reconnect_within_ttl() -> None:
    async with running(client_ttl=0.6) as server:
        streamer = server.streamer
        stream = await SSEStream.open(server.port, "/events?topic=keep")
        client_id = (await stream.config())["config"]["client_id"]
        await stream.close()
        await wait_for(lambda: not streamer.get_client(client_id).streams)  # type: ignore[union-attr]
        await asyncio.sleep(0.2)  # within the TTL: reconnect keeps the topics
        again = await SSEStream.open(server.port, f"/events?id={client_id}")
        assert (await again.config())["subscriptions"] == ["keep"]
        await again.close()
        await wait_for(lambda: streamer.get_client(client_id) is None, timeout=5)
        late = await SSEStream.open(server.port, f"/events?id={client_id}")
        assert late.status == 401
        await late.close()
        assert streamer.driver.stats()["subscriptions"] == 0


async def test_heartbeat_on_idle_stream() -> None:
    async with running(heartbeat=0.2) as server:
        stream = await SSEStream.open(server.port, "/events")
        await stream.config()
        assert await stream.frame(timeout=3) == b":\n\n"
        await stream.close()


async def test_last_event_id_without_history_says_not_recovered() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events", {"Last-Event-ID": "abc-1"})
        await stream.config()
        replay = orjson.loads((await stream.event())["data"])
        assert replay == {"replay": {"last_event_id": "abc-1", "recovered": False}}
        await stream.close()
        stream = await SSEStream.open(server.port, "/events?last_event_id=abc-2")
        await stream.config()
        assert orjson.loads((await stream.event())["data"])["replay"]["last_event_id"] == "abc-2"
        await stream.close()


async def test_remove_client_ends_streams_with_client_closed() -> None:
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=t")
        client_id = (await stream.config())["config"]["client_id"]
        await server.streamer.remove_client(client_id)
        assert await stream.frame() == b"event: message\ndata: Client closed\n\n"
        assert await stream.reader.read() == b""  # then the server closes
        await stream.close()


async def test_shutdown_sends_client_closed_to_every_stream() -> None:
    async with running() as server:
        port = server.port
        streams = [await SSEStream.open(port, "/events?topic=t") for _ in range(3)]
        for stream in streams:
            await stream.config()
        await server.streamer.close()
        for stream in streams:
            closing_retry(await stream.closing())  # shutdown, then Client closed with retry:
            assert await stream.reader.read() == b""
            await stream.close()
        # New connections are refused once shut down.
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_slow_consumer_is_disconnected_and_others_get_everything() -> None:
    options = {"max_pending_bytes": 256 * 1024, "write_buffer_high_bytes": 16 * 1024}
    async with running(**options) as server:
        slow = await SSEStream.open(server.port, "/events?topic=flood")
        await slow.config()
        fast = await SSEStream.open(server.port, "/events?topic=flood")
        await fast.config()
        received = bytearray()

        async def drain() -> None:
            frames = 0
            while frames < 2000:
                chunk = await fast.reader.read(1 << 16)
                assert chunk
                # Count frame ends in the new bytes only (one may straddle reads).
                start = max(0, len(received) - 1)
                received.extend(chunk)
                frames += received.count(b"\n\n", start)

        reader = asyncio.create_task(drain())
        body = b"x" * 10_000
        for _ in range(2000):  # 20 MB: far more than the socket buffers hold
            await server.streamer.publish("flood", body)
            await asyncio.sleep(0)
        await asyncio.wait_for(reader, 20)
        hub = server.streamer.hub
        await wait_for(lambda: hub.slow_disconnects == 1)
        assert hub.subscriber_count("flood") == 1
        assert received.count(b"data: " + body) == 2000
        await fast.close()
        await slow.close()


async def test_reader_that_stalls_then_catches_up_gets_every_frame_in_order() -> None:
    """Exercises partial socket writes: kernel buffer full, the transport takes
    the rest, the stream pauses, queues, and resumes in order."""
    async with running(max_pending_bytes=64 * 1024 * 1024) as server:
        stream = await SSEStream.open(server.port, "/events?topic=big")
        await stream.config()
        body = b"y" * 20_000
        for i in range(1000):  # 20 MB while nobody reads
            await server.streamer.publish("big", b"%06d" % i + body)
            if i % 50 == 0:
                await asyncio.sleep(0.001)
        hub = server.streamer.hub
        assert hub.direct_writes > 0
        (sub,) = hub.open_subscribers()
        # The kernel and the transport are full: frames wait in our queue.
        assert sub.paused and sub.pending_bytes > 1_000_000
        seen = 0
        while seen < 1000:
            event = await stream.event()
            assert event["data"] == f"{seen:06d}" + body.decode()
            seen += 1
        assert hub.slow_disconnects == 0
        await stream.close()


class _PartialTransport:
    """A TCP transport over a real socket with a small kernel buffer: what
    the fan-out core's writev() leaves, it holds (and pauses its protocol,
    as uvloop does) until ``drain()`` has pushed it into the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held = b""
        self.high = 65536
        self.protocol: asyncio.Protocol | None = None
        self.paused = False
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"socket": self.sock, "peername": ("127.0.0.1", 40000)}.get(name, default)

    def set_protocol(self, protocol: asyncio.Protocol) -> None:
        self.protocol = protocol  # the stream, once its head is written

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high or 0
        self._maybe_pause()

    def get_write_buffer_size(self) -> int:
        return len(self.held)

    def write(self, data: bytes) -> None:
        if not self.held:
            with contextlib.suppress(BlockingIOError):
                data = data[self.sock.send(data) :]
        self.held += data
        self._maybe_pause()

    def _maybe_pause(self) -> None:
        if len(self.held) > self.high and not self.paused and self.protocol is not None:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self, reader: socket.socket) -> bytes:
        """Push what is held into the socket, reading the other end to make
        room; returns what was read meanwhile."""
        data = b""
        while self.held:
            try:
                self.held = self.held[self.sock.send(self.held) :]
            except BlockingIOError:
                with contextlib.suppress(BlockingIOError):
                    data += reader.recv(1 << 20)
        if self.paused and self.protocol is not None:
            self.paused = False
            self.protocol.resume_writing()
        return data

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close


async def test_a_head_the_kernel_takes_in_part_is_not_overtaken_by_frames() -> None:
    """The kernel takes part of a stream's head (a first frame listing many
    topics) and the transport holds the rest: live frames must wait behind
    it, not be written to the socket ahead of its tail."""
    async with running(stream_send_buffer_bytes=4096) as server:
        topics = [f"{i:03d}-" + "t" * 200 for i in range(300)]  # a ~64 KB first frame
        client = await server.streamer.new_client(topics)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        transport = _PartialTransport(ours)
        protocol = server.protocol_factory()
        transport.protocol = protocol
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(
            f"GET /events?id={client.id} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
        )
        await asyncio.sleep(0.01)  # the hub's flush writes what the kernel takes
        assert len(client.streams) == 1 and transport.held
        # The reader takes what reached it, so the kernel has room again
        # while the transport still holds the head's tail.
        data = theirs.recv(1 << 20)
        for i in range(20):
            await server.streamer.publish(topics[0], b"m%d" % i)
        await asyncio.sleep(0.01)
        deadline = asyncio.get_running_loop().time() + 5
        while b"data: m19\n\n" not in data:  # a reader that reads again
            assert asyncio.get_running_loop().time() < deadline, data[-300:]
            data += transport.drain(theirs)
            with contextlib.suppress(BlockingIOError):
                data += theirs.recv(1 << 20)
            await asyncio.sleep(0.001)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        frames = body.split(b"\n\n")
        assert orjson.loads(parse_frame(frames[0] + b"\n\n")["data"])["subscriptions"] == topics
        events = [parse_frame(f + b"\n\n") for f in frames[1:21]]
        assert [e["data"] for e in events] == [f"m{i}" for i in range(20)]
        protocol.connection_lost(None)
        ours.close()
        theirs.close()


async def test_a_server_shutting_down_ends_only_its_own_streams() -> None:
    streamer = Streamer(Config(port=0))
    await streamer.start()
    try:
        first, second = await streamer.serve(), await streamer.serve()
        mine = await SSEStream.open(first.port, "/events?topic=t")
        other = await SSEStream.open(second.port, "/events?topic=t")
        await mine.config()
        await other.config()
        await first.shutdown()
        closing_retry(await mine.closing())  # shutdown, then Client closed
        await streamer.publish("t", b"still here")
        assert (await other.event())["data"] == "still here"
        await mine.close()
        await other.close()
    finally:
        await streamer.close()
