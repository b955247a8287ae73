"""docs/protocol.md shows bytes: each block marked ``<!-- bytes: NAME -->`` is
what the server sends, checked here against a real server where it can be
produced on demand, and against the encoder otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import orjson
import pytest

from gochan._fast import HEARTBEAT
from gochan.frames import (
    CLIENT_CLOSED_FRAME,
    closing_frame,
    first_frame,
    replay_frame,
    subscription_failure_frame,
)
from tests.support import SSEStream, running

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
MARKED = re.compile(r"<!-- bytes: ([\w-]+) -->\n```\w*\n(.*?)```", re.S)


def blocks() -> dict[str, bytes]:
    """Each marked block's text as bytes, LF line ends; the fence's last
    line break ends the last line (a frame's blank line is an empty line)."""
    found = {name: body.encode() for name, body in MARKED.findall(DOC.read_text())}
    assert found, f"no marked blocks in {DOC}"
    return found


def frame_fields(frame: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in frame.decode().splitlines() if line]  # type: ignore[misc]


def test_every_marked_block_is_checked() -> None:
    assert set(blocks()) == {
        "stream-head",
        "first-frame",
        "message",
        "heartbeat",
        "subscription-failure",
        "client-closed",
        "shutdown",
        "replay",
        "batch-request",
        "batch-answer",
    }


async def test_the_stream_head_and_first_frame_are_the_servers() -> None:
    doc = blocks()
    status_line, *header_lines = doc["stream-head"].decode().strip().split("\n")
    async with running() as server:
        stream = await SSEStream.open(server.port, "/events?topic=news&topic=sport")
        try:
            assert stream.head.decode("latin-1").split("\r\n")[0] == status_line
            for line in header_lines:
                name, _, value = line.partition(": ")
                assert stream.headers[name.lower()] == value, name
            first = await stream.frame()
        finally:
            await stream.close()
    # The doc's id is an example: the frame is the doc's with the real id in it.
    doc_id = re.search(rb'"client_id":"([^"]+)"', doc["first-frame"])
    real_id = re.search(rb'"client_id":"([^"]+)"', first)
    assert doc_id and real_id
    assert len(doc_id[1]) == len(real_id[1])  # a generated id's form
    assert first == doc["first-frame"].replace(doc_id[1], real_id[1])
    assert first == first_frame(real_id[1].decode(), 60.0, ["news", "sport"])


async def test_a_message_frame_is_the_servers() -> None:
    doc = blocks()["message"]
    fields = frame_fields(doc)
    topic, event_id = fields[0][1], fields[1][1]
    body = "\r\n".join(value for name, value in fields if name == "data").encode()
    async with running() as server:
        stream = await SSEStream.open(server.port, f"/events?topic={topic}")
        try:
            await stream.frame()
            async with httpx.AsyncClient() as http:
                answer = await http.post(
                    f"http://127.0.0.1:{server.port}/publish?topic={topic}", content=body
                )
            assert answer.status_code == 200
            real_id = answer.json()["id"]
            frame = await stream.frame()
        finally:
            await stream.close()
    # The id's form (<epoch>-<sequence>) is the doc's; its value is the node's.
    assert re.fullmatch(r"[0-9a-f]{8}-\d+", event_id) and re.fullmatch(r"[0-9a-f]{8}-\d+", real_id)
    assert frame == doc.replace(event_id.encode(), real_id.encode())


async def test_a_batch_and_its_answer_are_the_servers() -> None:
    doc = blocks()
    lines = [orjson.loads(line) for line in doc["batch-request"].splitlines()]
    doc_ids = orjson.loads(doc["batch-answer"])["ids"]
    topics = list(dict.fromkeys(line["topic"] for line in lines))
    async with running() as server:
        query = "&".join(f"topic={t}" for t in topics)
        stream = await SSEStream.open(server.port, f"/events?{query}")
        try:
            await stream.frame()
            async with httpx.AsyncClient() as http:
                answer = await http.post(
                    f"http://127.0.0.1:{server.port}/publish",
                    content=doc["batch-request"],
                    headers={"Content-Type": "application/x-ndjson"},
                )
            assert answer.status_code == 200, answer.text
            frames = [await stream.event() for _ in lines]
        finally:
            await stream.close()
    real_ids = answer.json()["ids"]
    assert len(real_ids) == len(doc_ids) == len(lines)
    body = doc["batch-answer"].strip()
    for doc_id, real_id in zip(doc_ids, real_ids, strict=True):
        body = body.replace(doc_id.encode(), real_id.encode())
    assert answer.content == body
    # The doc's ids follow each other, as the node's do.
    assert [int(i.split("-")[1]) for i in doc_ids] == list(range(43, 43 + len(lines)))
    for line, frame, real_id in zip(lines, frames, real_ids, strict=True):
        data = line["data"]
        sent = data if isinstance(data, str) else orjson.dumps(data).decode()
        assert (frame["event"], frame["id"], frame["data"]) == (line["topic"], real_id, sent)


async def test_the_shutdown_frames_are_the_servers() -> None:
    doc = blocks()["shutdown"]
    retry_ms = int(re.search(rb"retry: (\d+)", doc)[1])  # type: ignore[index]
    delay = retry_ms / 1000
    async with running(shutdown_retry_min=delay, shutdown_retry_max=delay) as server:
        stream = await SSEStream.open(server.port, "/events?topic=news")
        try:
            await stream.frame()
            await server.shutdown()
            ending = await stream.closing()
            assert await stream.reader.read() == b""  # then the server closes
        finally:
            await stream.close()
    assert ending == doc


@pytest.mark.parametrize(
    ("name", "frame"),
    [
        ("heartbeat", HEARTBEAT),
        ("client-closed", CLIENT_CLOSED_FRAME),
        ("shutdown", closing_frame(17342)),
        ("replay", replay_frame("5f3a9c1e-42", True)),
        ("subscription-failure", subscription_failure_frame("news", "permission denied")),
    ],
)
def test_system_frames_are_the_encoders(name: str, frame: bytes) -> None:
    assert blocks()[name] == frame
