"""The README's embedding example runs as written."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support import SSEStream, free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def test_embedding_example_runs() -> None:
    text = README.read_text()
    match = re.search(r"<!-- embed-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the embedding example is missing from the README"
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("listening on ")
    assert lines[1] == "2 ['news', 'weather']"
    assert re.fullmatch(r"published [0-9a-f]{8}-1", lines[2])


async def test_asgi_mounting_example_serves_gochan() -> None:
    import uvicorn

    text = README.read_text()
    match = re.search(r"<!-- readme-asgi[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "the ASGI example is missing from the README"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    port = free_port()
    config = uvicorn.Config(namespace["app"], host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        stream = await SSEStream.open(port, "/realtime/events?topic=news", {})
        assert (await stream.config())["subscriptions"] == ["news"]
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"http://127.0.0.1:{port}/realtime/publish?topic=news", content=b"hi"
            )
            assert r.status_code == 200
        event = await stream.event()
        assert (event["event"], event["data"]) == ("news", "hi")
        await stream.close()
    finally:
        realtime = namespace["realtime"]
        realtime.end_streams()  # type: ignore[attr-defined]
        server.should_exit = True
        await task
