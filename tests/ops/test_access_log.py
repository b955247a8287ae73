"""The access log of a real ``python -m gochan.server``: one JSON line per
request on stderr, a line per stream when it ends, never a token, a cookie
or a client id; nothing when it is off (the default)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from gochan.server.access import redact_query
from tests.hardening._proc import ServerProcess, server_process
from tests.support import SSEStream, raw_request, wait_for

KEY = "pk-7f3e1d9a"
TOKEN = "tok-4c2b8e6f"
COOKIE = "ck-9d1a7b3c"
FIELDS = {"time", "peer", "method", "path", "query", "status", "bytes", "duration_s", "stream"}


def access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """The JSON lines of the server's stderr (its other lines are text)."""
    return [orjson.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]


async def traffic(server: ServerProcess) -> str:
    """A stream, a second stream of the same client with secrets in its
    query and headers, a publish with a key, a healthz naming the id
    escaped, a 404, a malformed request; returns the client id."""
    port = server.port
    first = await SSEStream.open(port, "/events?topic=a")
    client_id = (await first.config())["config"]["client_id"]
    second = await SSEStream.open(
        port,
        f"/events?topic=b&id={client_id}&access_token={TOKEN}",
        {"Cookie": f"gochan_token={COOKIE}", "Authorization": f"Bearer {TOKEN}"},
    )
    await second.config()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        r = await http.post(
            "/publish?topic=a", content=b"hi", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert r.status_code == 200
        assert (await first.event())["data"] == "hi"
        assert (await http.get(f"/healthz?%69d={client_id}")).status_code == 200
        assert (await http.get("/nope")).status_code == 404
    answer = await raw_request(port, b"NOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    await second.close()
    await first.close()
    return client_id


async def test_access_log_lines(tmp_path: Path) -> None:
    with server_process(tmp_path, "--access-log", "--publish-key", KEY) as server:
        started = time.monotonic()
        client_id = await traffic(server)
        await wait_for(lambda: len(access_lines(server)) >= 6, timeout=10)
        await asyncio.sleep(0.2)
        took = time.monotonic() - started
        lines = access_lines(server)
        log = server.stderr()
    assert all(set(line) == FIELDS for line in lines), lines
    assert len(lines) == 6, lines
    by_path = {(line["method"], line["path"]): line for line in lines if not line["stream"]}
    streams = [line for line in lines if line["stream"]]
    assert len(by_path) == 4 and len(streams) == 2, lines
    # Answered before a request was read whole: what is known of it.
    malformed = by_path[(None, None)]
    assert (malformed["status"], malformed["query"], malformed["duration_s"]) == (400, "", None)
    assert [line["query"] for line in streams] == [
        "topic=b&id=[redacted]&access_token=[redacted]",
        "topic=a",
    ]  # the second ended first
    for line in streams:
        assert (line["method"], line["path"], line["status"]) == ("GET", "/events", 200)
        assert line["bytes"] > 100  # the head and first frame, at least
        assert 0 < line["duration_s"] < took
    publish = by_path[("POST", "/publish")]
    assert (publish["status"], publish["query"]) == (200, "topic=a")
    healthz = by_path[("GET", "/healthz")]
    assert (healthz["status"], healthz["query"]) == (200, "%69d=[redacted]")
    assert by_path[("GET", "/nope")]["status"] == 404
    for line in lines:
        assert line["peer"] == "127.0.0.1"
        assert line["time"].endswith("Z")
        assert line["duration_s"] is None or line["duration_s"] >= 0
    for secret in (client_id, TOKEN, COOKIE, KEY):
        assert secret not in log


async def test_no_access_log_by_default(tmp_path: Path) -> None:
    with server_process(tmp_path, "--publish-key", KEY) as server:
        await traffic(server)
        await asyncio.sleep(0.3)
        assert access_lines(server) == []
        assert "Authorization" not in server.stderr()


def test_redact_query() -> None:
    assert redact_query("") == ""
    assert redact_query("topic=a&id=s3&topic=b") == "topic=a&id=[redacted]&topic=b"
    assert redact_query("ID=s3&Access_Token=t&%61ccess%5Ftoken=t") == (
        "ID=[redacted]&Access_Token=[redacted]&%61ccess%5Ftoken=[redacted]"
    )
    assert redact_query("id=&idx=1&id") == "id=&idx=1&id"  # nothing to hide
    long = redact_query("topic=" + "t" * 5000 + "&id=secret")
    assert "secret" not in long and long.endswith("...")
