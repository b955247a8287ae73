"""The README's code blocks run as written, or say they are illustrative."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
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


def fastapi_example_command() -> list[str]:
    """The README's command that runs examples/fastapi_app.py, as argv."""
    text = README.read_text()
    match = re.search(r"<!-- readme-fastapi-example[^>]*-->\s*```sh\n(.*?)```", text, re.S)
    assert match, "the command running the FastAPI example is missing from the README"
    (line,) = [ln for ln in match.group(1).splitlines() if ln.startswith("uvicorn ")]
    return shlex.split(line)


async def test_fastapi_example_command_starts_it_safe() -> None:
    """The README's command serves the example, and the example refuses what
    the issue found open: bob reading alice's topic, anonymous streams."""
    argv = fastapi_example_command()
    assert argv[:2] == ["uvicorn", "examples.fastapi_app:app"], argv
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "EXAMPLE_TOKENS"}  # the demo users
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv, "--port", str(port),
        cwd=README.parent, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    bob = {"Authorization": "Bearer bob-token"}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    health = await http.get("/realtime/healthz")
                    break
                assert proc.returncode is None, "uvicorn exited"
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the example did not start")
            assert (health.status_code, health.text) == (200, "ok\n")
            assert (await http.get("/api/me", headers=bob)).json()["name"] == "bob"
            assert (await http.get("/realtime/events?topic=news")).status_code == 401
            r = await http.get("/realtime/events?topic=user.alice.inbox", headers=bob)
            assert r.status_code == 403
            url = "/realtime/events?topic=user.bob.inbox"
            async with http.stream("GET", url, headers=bob) as stream:
                assert stream.status_code == 200
                assert stream.headers["server"] == "gochan"  # --no-server-header
                lines = stream.aiter_lines()
                while (await anext(lines)) != "":  # the first frame: the client's config
                    pass
                r = await http.post(
                    "/api/messages",
                    json={"to": "bob", "text": "hi"},
                    headers={"Authorization": "Bearer alice-token"},
                )
                assert r.status_code == 200
                frame = [await anext(lines) for _ in range(3)]
                assert frame == [
                    "event: user.bob.inbox",
                    f"id: {r.json()['id']}",
                    "data: alice: hi",
                ]
                proc.send_signal(signal.SIGTERM)
                # uvicorn exits by raising the signal again once it has shut down.
                assert await asyncio.wait_for(proc.wait(), 15) in (0, -signal.SIGTERM)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert "Application startup complete" in log and "ERROR" not in log, log


def walkthrough() -> list[tuple[str, str]]:
    """The curl walkthrough's blocks, in order: (command, expected output) for
    each ``$`` line of a ``console`` block (continuations joined), and
    ("", text) for a plain block (what the stream shows)."""
    text = README.read_text()
    section = text.split("<!-- readme-curl", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, str]] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, re.S):
        if lang == "js":  # the EventSource snippet: tests/browser covers gochan.js
            continue
        if lang != "console":
            steps.append(("", body))
            continue
        command, _, output = body.partition("\n")
        while command.endswith("\\"):
            more, _, output = output.partition("\n")
            command = command[:-1] + more.strip()
        steps.append((command.removeprefix("$ "), output))
    return steps


def test_curl_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """Each command of the walkthrough run with curl against
    ``python -m gochan.server``; each answer is the README's, but for the
    client id and the node's epoch in event ids, which are random."""
    import shutil

    from tests.hardening._proc import server_process

    if shutil.which("curl") is None:
        import pytest

        pytest.skip("curl is not installed (apt-get install curl)")
    steps = walkthrough()
    assert [bool(c) for c, _ in steps] == [True, True, False, True, True, True], steps
    doc_id = re.search(r'"client_id":"([^"]+)"', steps[0][1])
    doc_epoch = re.search(r'"id":"([0-9a-f]{8})-1"', steps[1][1])
    assert doc_id and doc_epoch
    with server_process(tmp_path) as server:

        def run(command: str) -> str:
            command = command.replace("localhost:3000", f"127.0.0.1:{server.port}") + " -sS"
            done = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=10
            )
            assert done.returncode == 0, done.stderr
            return done.stdout + "\n"  # a terminal shows the prompt on the next line

        stream_command = steps[0][0].replace("localhost:3000", f"127.0.0.1:{server.port}")
        stream = subprocess.Popen(
            ["bash", "-c", stream_command + " 2>/dev/null"], stdout=subprocess.PIPE
        )
        try:
            assert stream.stdout is not None
            first = stream.stdout.readline() + stream.stdout.readline() + stream.stdout.readline()
            real_id = re.search(rb'"client_id":"([^"]+)"', first)
            assert real_id, first
            client_id = real_id[1].decode()
            assert first.decode() == steps[0][1].replace(doc_id[1], client_id)

            published = run(steps[1][0])
            real_epoch = re.fullmatch(r'\{"id":"([0-9a-f]{8})-1"\}\n', published)
            assert real_epoch, published
            epoch = real_epoch[1]

            def expected(text: str) -> str:
                return text.replace(doc_id[1], client_id).replace(doc_epoch[1], epoch)

            assert published == expected(steps[1][1])
            shown = b"".join(stream.stdout.readline() for _ in range(4)).decode()
            assert shown == expected(steps[2][1])
            assert run(steps[3][0]) == expected(steps[3][1])
            shown = b"".join(stream.stdout.readline() for _ in range(4)).decode()
            assert shown == expected('event: a\nid: 3f9c1a2b-2\ndata: {"n":1}\n\n')
            assert run(steps[4][0]) == expected(steps[4][1])  # a batch: a and b
            shown = b"".join(stream.stdout.readline() for _ in range(4)).decode()
            assert shown == expected("event: a\nid: 3f9c1a2b-3\ndata: one\n\n")
            update = steps[5][0].replace(doc_id[1], client_id)
            assert run(update) == expected(steps[5][1])
        finally:
            stream.kill()
            stream.wait()
            if stream.stdout is not None:
                stream.stdout.close()


def readme_blocks() -> list[tuple[str, str, str]]:
    """(marker of the comment just before it or '', language, text) of every
    fenced block of the README."""
    pattern = r"(?:<!-- ([\w-]+)[^>]*-->\n)?^```(\w*)\n(.*?)^```"
    return [(m[1] or "", m[2], m[3]) for m in re.finditer(pattern, README.read_text(), re.S | re.M)]


def test_every_readme_block_runs_in_a_test_or_is_marked_illustrative() -> None:
    """A block runs in a test when it is marked so, sits in the curl
    walkthrough, or is a ``python -m gochan.server`` command line (each is
    run with --check-config by tests/test_docs.py); the two quick-start
    commands are what CI runs. Anything else says it is illustrative."""
    text = README.read_text()
    curl = text.split("<!-- readme-curl", 1)[1].split("\n## ", 1)[0]
    tested_markers = {
        "readme-js",
        "embed-example",
        "readme-asgi",
        "readme-security",
        "readme-production",
        "readme-errors",
        "readme-yaml",
        "readme-fastapi-example",
    }
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    untested = []
    for marker, lang, body in readme_blocks():
        if marker in tested_markers or marker == "illustrative":
            continue
        if f"```{lang}\n{body}```" in curl or f"```{lang}\n{body}```" in quick_start:
            continue
        if lang == "sh" and re.search(r"python3? -m gochan\.server", body):
            continue
        untested.append(body[:80])
    assert not untested, untested


def test_the_configuration_errors_are_the_clis(tmp_path: Path) -> None:
    """Each line of the README's error block, from the CLI: a bad port, a bad
    log level, and a driver whose extra is missing (its package hidden)."""
    (block,) = [body for marker, _, body in readme_blocks() if marker == "readme-errors"]
    expected = block.splitlines()
    hide_nats = (
        "import sys; sys.modules['nats'] = None; "  # as if gochan[nats] were not installed
        "from gochan.server.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    runs = [
        [sys.executable, "-m", "gochan.server", "--port", "abc"],
        [sys.executable, "-m", "gochan.server", "--log-level", "verbose"],
        [sys.executable, "-c", hide_nats, "--driver", "nats"],
    ]
    assert len(runs) == len(expected)
    for argv, line in zip(runs, expected, strict=True):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.strip() == line, argv


def test_the_yaml_example_is_a_valid_configuration(tmp_path: Path) -> None:
    (block,) = [body for marker, _, body in readme_blocks() if marker == "readme-yaml"]
    path = tmp_path / "gochan.yaml"
    path.write_text(block)
    done = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^driver +=? *nats +\(yaml\)$", done.stdout, re.M), done.stdout
    assert "nats://10.0.0.5:4222" in done.stdout
