"""``python -m gochan.server`` as a user runs it, and where its settings come from."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from gochan.config import Config
from gochan.errors import ConfigurationError
from gochan.server.__main__ import parse_args
from tests.support import SSEStream, closing_retry, free_port


async def start_server(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gochan.server", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 15)
    assert b"gochan listening on http://127.0.0.1:" in line, line
    return proc


async def test_run_stream_publish_and_sigterm() -> None:
    port = free_port()
    proc = await start_server("--port", str(port), "--heartbeat", "30")
    try:
        stream = await SSEStream.open(port, "/events?topic=a")
        assert (await stream.config())["subscriptions"] == ["a"]
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://127.0.0.1:{port}/publish?topic=a", content=b"hi")
            assert r.status_code == 200
        assert await stream.frame() == b"event: a\nid: %s\ndata: hi\n\n" % r.json()["id"].encode()
        proc.send_signal(signal.SIGTERM)
        closing_retry(await stream.closing())
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await stream.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigint_stops_cleanly_and_env_sets_options() -> None:
    port = free_port()
    proc = await start_server(env={"GOCHAN_PORT": str(port), "GOCHAN_CLIENT_TTL": "5"})
    try:
        stream = await SSEStream.open(port, "/events")
        assert (await stream.config())["config"]["client_ttl_millis"] == 5000
        proc.send_signal(signal.SIGINT)
        closing_retry(await stream.closing())
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await stream.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_configuration_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--driver", "nope"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("gochan: driver: expected one of kafka, mem,")
    result = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--heartbeat", "-1"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == "gochan: heartbeat: expected a number > 0, got '-1'\n"


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "gochan.yaml"
    config_file.write_text("port: 4000\nheartbeat: 5\nclient_ttl: 10\ncors_origins: [a, b]\n")
    config = Config.from_sources(
        yaml_file=str(config_file),
        env={"GOCHAN_HEARTBEAT": "6", "GOCHAN_CLIENT_TTL": "11"},
        flags={"client_ttl": "12"},
    )
    assert config.port == 4000  # YAML over the default
    assert config.heartbeat == 6.0  # env over YAML
    assert config.client_ttl == 12.0  # flag over env
    assert config.cors_origins == ["a", "b"]
    assert config.max_topics_per_client == 1024  # default


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_setting: 1\n")
    with pytest.raises(ConfigurationError, match="no_such_setting"):
        Config.from_sources(yaml_file=str(bad), env={})
    with pytest.raises(ConfigurationError, match="cannot read"):
        Config.from_sources(yaml_file=str(tmp_path / "missing.yaml"), env={})
    with pytest.raises(ConfigurationError, match="port"):
        Config.from_sources(env={"GOCHAN_PORT": "eighty"})


def test_driver_flags_are_collected() -> None:
    args, driver_flags = parse_args(["--driver", "mem", "--port", "1"])
    assert args.driver == "mem" and args.port == "1" and driver_flags == {}
    args, driver_flags = parse_args(["--nats-url", "x", "--nats-jetstream", "--nats-prefix=p."])
    assert driver_flags == {"nats-url": "x", "nats-jetstream": None, "nats-prefix": "p."}
    with pytest.raises(ConfigurationError, match="no option"):
        Config.from_sources(env={}, flags={"driver": "mem"}, driver_flags={"mem-url": "x"})


def test_the_gochan_console_script_is_the_cli() -> None:
    """``pip install`` puts ``gochan`` beside the interpreter (the README says
    so): it takes the same flags as ``python -m gochan.server``."""
    script = Path(sys.executable).parent / "gochan"
    assert script.is_file(), f"{script} is not installed (pip install -e .)"
    done = subprocess.run(
        [str(script), "--check-config", "--port", "4321"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"^port +=? *4321 +\(flag --port\)$", done.stdout, re.M), done.stdout
