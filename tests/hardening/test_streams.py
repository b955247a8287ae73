"""Streams whose readers stop reading: at SIGTERM they get their backlog and
the shutdown frame and ``Client closed`` within the grace period (issue 10, item 7); past the
pending bound they are cut with a reset that frees the kernel's memory at
once and tells the client (item 8)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from tests.support import SHUTDOWN_FRAMES, running, wait_for

from ._proc import open_stuck_stream, read_to_end, read_until_cut, server_process

STREAMS = 40
MESSAGES = 300
PAYLOAD = b"x" * 1000
TCP_FIN_WAIT1 = "04"  # /proc/net/tcp state codes
TCP_LISTEN = "0A"


def test_sigterm_delivers_the_backlog_of_paused_streams(tmp_path: Path) -> None:
    # A small kernel buffer, so the backlog does not all fit in the kernel.
    flags = ("--shutdown-grace", "20", "--heartbeat", "60", "--stream-send-buffer-bytes", "65536")
    with server_process(tmp_path, *flags) as server:
        socks = [open_stuck_stream(server.port, "backlog") for _ in range(STREAMS)]
        with httpx.Client() as http:
            for i in range(MESSAGES):
                r = http.post(
                    f"http://127.0.0.1:{server.port}/publish?topic=backlog",
                    content=b"%d " % i + PAYLOAD,
                )
                assert r.status_code == 200
        time.sleep(0.3)  # the backlog sits in gochan's queues and transports
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.proc.poll() is None, "exited without waiting for its streams"
        complete = 0
        for sock in socks:
            data = read_to_end(sock)
            sock.close()
            # The backlog, then the shutdown frame and Client closed.
            ending = SHUTDOWN_FRAMES.search(data)
            backlog = data[: ending.start()] if ending and ending.end() == len(data) else b""
            numbers = [
                int(line[6:].split(b" ")[0])
                for line in backlog.split(b"\n")
                if line.startswith(b"data: ")
            ]
            if numbers == list(range(MESSAGES)):
                complete += 1
        assert complete == STREAMS
        assert server.proc.wait(20) == 0
        print(
            f"{STREAMS} backlogged streams complete, "
            f"exit {time.monotonic() - started:.2f} s after SIGTERM"
        )


def _server_sockets(port: int) -> dict[str, int]:
    """States of this machine's TCP sockets whose local port is ``port``."""
    states: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                states[fields[3]] = states.get(fields[3], 0) + 1
    return states


async def test_slow_consumers_are_reset_and_leave_nothing_in_the_kernel() -> None:
    limits = {"max_pending_bytes": 64 * 1024, "stream_send_buffer_bytes": 64 * 1024}
    async with running(**limits) as server, httpx.AsyncClient() as http:
        port = server.port
        loop = asyncio.get_running_loop()
        socks = [
            await loop.run_in_executor(None, open_stuck_stream, port, "slow") for _ in range(20)
        ]
        url = f"http://127.0.0.1:{port}/publish?topic=slow"
        for _ in range(2000):
            assert (await http.post(url, content=PAYLOAD)).status_code == 200
            if server.streamer.hub.slow_disconnects == len(socks):
                break
        assert server.streamer.hub.slow_disconnects == len(socks)
        await wait_for(lambda: server.streamer.hub.connection_count == 0)
        states = _server_sockets(port)
        states.pop(TCP_LISTEN, None)
        # No orphan in FIN-WAIT-1 holding the kernel's copy of the backlog.
        assert states.get(TCP_FIN_WAIT1, 0) == 0, states
        # Read in threads: the server resets each once its peer has taken
        # what was already written to it (a whole number of frames).
        cuts = await asyncio.gather(
            *[loop.run_in_executor(None, read_until_cut, sock) for sock in socks]
        )
        for sock in socks:
            sock.close()
        # The client learns it was cut, and reconnects.
        assert [reset for _data, reset in cuts] == [True] * len(socks)
        assert all(data.endswith(b"\n\n") for data, _reset in cuts)
        assert server.streamer.hub.cutting_count == 0
