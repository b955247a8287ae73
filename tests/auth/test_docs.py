"""docs/authorization.md: its examples run as written, against a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jwt

from gochan import Streamer
from tests.support import SSEStream, running

DOC = Path(__file__).resolve().parents[2] / "docs" / "authorization.md"


def example(name: str) -> dict[str, Any]:
    match = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, f"{name} is missing from {DOC.name}"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOC), "exec"), namespace)
    return namespace


async def test_the_hook_example_guards_a_real_server() -> None:
    namespace = example("auth-hook-example")
    streamer: Streamer = namespace["streamer"]
    async with streamer:
        server = await streamer.serve()
        cookie = {"Cookie": "session=s-4f1c9a"}
        refused = await SSEStream.open(server.port, "/events?topic=news", {})
        assert (refused.status, await refused.body()) == (401, b"log in first\n")
        await refused.close()
        foreign = await SSEStream.open(server.port, "/events?topic=user.bob.inbox", cookie)
        assert foreign.status == 403
        await foreign.close()
        stream = await SSEStream.open(server.port, "/events?topic=news&topic=user.alice.x", cookie)
        assert (await stream.config())["subscriptions"] == ["news", "user.alice.x"]
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as http:
            r = await http.post("/publish?topic=news", content="no", headers=cookie)
            assert r.status_code == 403
            r = await http.post("/publish?topic=user.alice.x", content="yes", headers=cookie)
            assert r.status_code == 200
        assert (await stream.event())["data"] == "yes"
        await stream.close()


async def test_the_minted_token_opens_a_stream_on_a_server_with_that_secret() -> None:
    namespace = example("auth-mint-example")
    claims = jwt.decode(namespace["token"], namespace["SECRET"], algorithms=["HS256"])
    assert claims["sub"] == "alice"
    async with running(jwt_key=namespace["SECRET"]) as server:
        headers = {"Authorization": f"Bearer {namespace['token']}"}
        stream = await SSEStream.open(server.port, "/events?topic=user.alice.inbox", headers)
        assert (await stream.config())["subscriptions"] == ["user.alice.inbox"]
        await stream.close()
        denied = await SSEStream.open(server.port, "/events?topic=user.bob.inbox", headers)
        assert denied.status == 403
        await denied.close()
