"""A redis-server process owned by a test: started on a free loopback port
without persistence, stoppable and restartable on the SAME port (a broker
outage, which also empties it), optionally with other settings from the next
start on (``--user`` ACL rules), and always stopped afterwards."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from .conftest import free_port, require_binary, start_process, stop_process

START_TIMEOUT_S = 15.0


class RedisServer:
    def __init__(self) -> None:
        self.binary = require_binary("redis-server")
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="gochan-redis-")
        self.log_path = Path(self._tmp.name) / "redis.log"
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None, "already running"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._tmp.name,
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        try:
            self.proc = start_process(args, self.port, START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no log>"


def external_url() -> str | None:
    return os.environ.get("GOCHAN_REDIS_URL") or None
