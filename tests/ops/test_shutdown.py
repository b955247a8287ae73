"""SIGTERM on a real ``python -m gochan.server`` under load: every stream
gets a ``shutdown`` frame with its own delay from the configured window, then
``Client closed`` with that delay as ``retry:``,
the endings are spread over the grace period, the process exits within it
even when some clients never read, and a second signal exits at once."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import httpx
import orjson
import pytest

from gochan import Config
from gochan.config import load
from gochan.errors import ConfigurationError
from gochan.server.__main__ import FLAG_HELP
from gochan.server.app import SHUTDOWN_SPREAD_FRACTION
from tests.hardening._proc import ServerProcess, open_stuck_stream, server_process
from tests.support import SSEStream, closing_retry, parse_frame, running, wait_for

STREAMS = 200
STUCK = 10
GRACE_S = 6.0
RETRY_MIN_S, RETRY_MAX_S = 1.0, 5.0
EXIT_MARGIN_S = 4.0  # process start-up of the exit path on a loaded machine
FLAGS = (
    "--shutdown-grace", str(GRACE_S),
    "--shutdown-retry-min", str(RETRY_MIN_S),
    "--shutdown-retry-max", str(RETRY_MAX_S),
    "--connection-rate-per-peer", "0",  # 200 streams from one address at once
    "--heartbeat", "60",
    "--stream-send-buffer-bytes", "65536",
)  # fmt: skip
BACKLOG_MESSAGES = 200
PAYLOAD = b"x" * 2000


async def stuck_streams(server: ServerProcess, n: int) -> list[socket.socket]:
    """``n`` streams that never read past their first frame, with a backlog
    (400 KB each) that cannot fit in the kernel: they never finish."""
    loop = asyncio.get_running_loop()
    socks = [
        await loop.run_in_executor(None, open_stuck_stream, server.port, "stuck") for _ in range(n)
    ]
    async with httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{server.port}/publish?topic=stuck"
        for i in range(BACKLOG_MESSAGES):
            assert (await http.post(url, content=b"%d " % i + PAYLOAD)).status_code == 200
    return socks


async def test_sigterm_under_load_spreads_retries_and_endings(tmp_path: Path) -> None:
    with server_process(tmp_path, *FLAGS) as server:
        streams = [await SSEStream.open(server.port, "/events?topic=t") for _ in range(STREAMS)]
        for stream in streams:
            await stream.config()
        stuck = await stuck_streams(server, STUCK)
        loop = asyncio.get_running_loop()

        async def last_frame(stream: SSEStream) -> tuple[int, float]:
            notice = await stream.frame(timeout=GRACE_S + EXIT_MARGIN_S)
            closed = await stream.frame(timeout=GRACE_S + EXIT_MARGIN_S)
            ended = loop.time()
            # The frame JavaScript can read comes just before Client closed,
            # which is unchanged but for its retry: (the same delay).
            shutdown = parse_frame(notice)
            assert shutdown["event"] == "message", notice
            retry_ms = orjson.loads(shutdown["data"])["shutdown"]["retry_ms"]
            assert closed == b"retry: %d\nevent: message\ndata: Client closed\n\n" % retry_ms
            low, high = int(RETRY_MIN_S * 1000), int(RETRY_MAX_S * 1000)
            retry = closing_retry(notice + closed, low, high)
            assert retry == retry_ms
            assert await stream.reader.read() == b""  # then the server closes
            return retry, ended

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*[last_frame(s) for s in streams])
        code = await loop.run_in_executor(None, server.proc.wait, GRACE_S + EXIT_MARGIN_S)
        took = time.monotonic() - started
        for stream in streams:
            await stream.close()
        for sock in stuck:
            sock.close()
    retries = [retry for retry, _ended in results]
    endings = sorted(ended for _retry, ended in results)
    # Every stream got its own draw from the window: spread, not one value.
    assert len(set(retries)) > STREAMS // 2, sorted(retries)
    assert max(retries) - min(retries) > (RETRY_MAX_S - RETRY_MIN_S) * 1000 / 2
    # Ended over the first part of the grace, not in one burst: the first and
    # the last stream end a good part of that spread apart, and neither the
    # first nor the last tenth of the streams ended all at once.
    spread = GRACE_S * SHUTDOWN_SPREAD_FRACTION
    assert endings[-1] - endings[0] > spread * 0.3, endings[-1] - endings[0]
    tenth = STREAMS // 10
    assert endings[tenth] > endings[0] and endings[-1] > endings[-tenth - 1]
    # The stuck clients never read their backlog: the process exited anyway.
    assert code == 0
    assert took < GRACE_S + EXIT_MARGIN_S, took
    log = server.stderr()
    assert "still open after the" in log and "aborted" in log, log
    print(
        f"{STREAMS} streams ended over {endings[-1] - endings[0]:.2f} s, retries "
        f"{min(retries)}..{max(retries)} ms ({len(set(retries))} distinct), exit {took:.2f} s "
        f"after SIGTERM (grace {GRACE_S:g} s, {STUCK} clients never reading)"
    )


async def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    flags = ("--shutdown-grace", "60", "--heartbeat", "60", "--stream-send-buffer-bytes", "65536")
    with server_process(tmp_path, *flags) as server:
        stuck = await stuck_streams(server, 3)  # the first signal waits for these
        server.proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: "shutting down" in server.stderr(), timeout=10)
        await asyncio.sleep(0.5)
        assert server.proc.poll() is None, "exited without waiting for its streams"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, server.proc.wait, 10)
        took = time.monotonic() - started
        for sock in stuck:
            sock.close()
    assert code == 128 + signal.SIGTERM
    assert took < 10  # far inside the 60 s grace the first signal started
    assert "second signal (SIGTERM): exiting now" in server.stderr()


def test_retry_window_keys() -> None:
    config = Config()
    assert (config.shutdown_retry_min, config.shutdown_retry_max) == (1.0, 30.0)
    with pytest.raises(ConfigurationError, match=r"shutdown_retry_max: expected a number >= "):
        Config(shutdown_retry_min=5, shutdown_retry_max=2)
    with pytest.raises(ConfigurationError, match="shutdown_retry_min"):
        Config(shutdown_retry_min=-1)
    config, sources = load(
        env={"GOCHAN_SHUTDOWN_RETRY_MAX": "2.5"}, flags={"shutdown_retry_min": "0.5"}
    )
    assert (config.shutdown_retry_min, config.shutdown_retry_max) == (0.5, 2.5)
    assert sources["shutdown_retry_min"] == "flag --shutdown-retry-min"
    for key in (
        "shutdown_retry_min",
        "shutdown_retry_max",
        "connection_rate_per_peer",
        "connection_burst_per_peer",
        "access_log",
    ):
        assert "default" in FLAG_HELP[key], key


async def test_each_stream_draws_its_own_retry_from_the_window() -> None:
    async with running(shutdown_retry_min=2.0, shutdown_retry_max=2.5) as server:
        draws = {closing_retry(server.streamer.closing_frame(), 2000, 2500) for _ in range(200)}
        assert len(draws) > 50
    async with running(shutdown_retry_min=3.0, shutdown_retry_max=3.0) as server:
        assert closing_retry(server.streamer.closing_frame(), 3000, 3000) == 3000
