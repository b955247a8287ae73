"""The 1000-topics example runs with its flags: server + publisher, clients."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.support import free_port

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "1000topics"


async def test_1000topics_server_and_clients() -> None:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLE / "server.py"), "--port", str(port),
        "--topics", "50", "--interval", "0.1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        banner = await asyncio.wait_for(server.stdout.readline(), 15)
        assert b"50 topics" in banner
        clients = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE / "clients.py"), "--url", f"http://127.0.0.1:{port}",
            "--connections", "40", "--topics", "50", "--per-conn", "5", "--duration", "2",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(clients.communicate(), 20)
        assert clients.returncode == 0, out
        match = re.search(rb"connections (\d+)/40, errors (\d+), events (\d+)", out)
        assert match, out
        assert int(match.group(1)) == 40 and int(match.group(2)) == 0
        # 10 msgs/s per topic (500/s in all), each held by 4 of the 40 clients: ~2000 events/s.
        assert int(match.group(3)) > 500
    finally:
        server.terminate()
        await server.wait()
