"""A slow consumer is cut at a frame boundary: the frames it had not started
are dropped, what was already written reaches it, and only then is the
connection reset (or at a deadline, for a peer that reads nothing)."""

from __future__ import annotations

import asyncio
import re
import time

from tests.hardening._proc import open_stuck_stream, read_until_cut
from tests.support import running, wait_for

PAYLOAD = b"x" * 20_000  # larger than the reader's window: the kernel splits frames
LIMITS = {
    "max_pending_bytes": 64 * 1024,
    "stream_send_buffer_bytes": 32 * 1024,
    "heartbeat": 60.0,
}
FRAME = re.compile(rb"event: cut\nid: [^\n]+\ndata: (\d{6}) (x+)")


async def flood_until_cut(server: object, topic: str) -> int:
    """Publish numbered 20 KB messages until the hub cuts a slow consumer."""
    streamer = server.streamer  # type: ignore[attr-defined]
    n = 0
    while streamer.hub.slow_disconnects == 0:
        await streamer.publish(topic, b"%06d " % n + PAYLOAD)
        n += 1
        await asyncio.sleep(0)  # let the hub flush
        assert n < 100_000, "never cut"
    return n


async def test_a_cut_slow_consumer_receives_only_whole_frames() -> None:
    async with running(**LIMITS) as server:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, open_stuck_stream, server.port, "cut", 8192)
        published = await flood_until_cut(server, "cut")
        hub = server.streamer.hub
        # Bytes were in flight when it was cut: it waits for its peer to take them.
        assert hub.cutting_count == 1 and server.connections == 1
        data, reset = await loop.run_in_executor(None, read_until_cut, sock)
        sock.close()
        assert reset  # the client learns it was cut, reconnects and replays
        assert data.endswith(b"\n\n"), data[-80:]
        frames = data[:-2].split(b"\n\n")
        numbers = []
        for frame in frames:
            found = FRAME.fullmatch(frame)
            assert found is not None and found.group(2) == PAYLOAD, frame[:80]
            numbers.append(int(found.group(1)))
        # In order, nothing missing up to the cut; the frames after it are dropped.
        assert numbers == list(range(len(numbers)))
        assert 0 < len(numbers) < published
        assert hub.cutting_count == 0
        await wait_for(lambda: server.connections == 0)


async def test_a_cut_peer_that_reads_nothing_is_reset_at_the_deadline() -> None:
    async with running(**LIMITS) as server:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(None, open_stuck_stream, server.port, "cut", 8192)
        await flood_until_cut(server, "cut")
        hub = server.streamer.hub
        assert hub.cutting_count == 1
        await asyncio.sleep(1.0)  # two ticks: it is not drained, so it waits
        assert hub.cutting_count == 1 and server.connections == 1
        assert hub.sweep(time.monotonic() + hub.cut_linger) == 1  # the deadline passed
        assert hub.cutting_count == 0
        await wait_for(lambda: server.connections == 0)
        _data, reset = await loop.run_in_executor(None, read_until_cut, sock)
        sock.close()
        assert reset
