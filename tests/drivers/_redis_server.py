"""A redis-server process owned by a test: started on a free loopback port
without persistence, stoppable and restartable on the SAME port (a broker
outage, which also empties it), optionally with other settings from the next
start on (``--user`` ACL rules), and always stopped afterwards."""

from __future__ import annotations

import os

from ._process import ServerProcess
from .conftest import require_binary


class RedisServer(ServerProcess):
    program = "redis-server"

    def __init__(self) -> None:
        self.binary = require_binary(self.program)
        super().__init__()
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip


def external_url() -> str | None:
    return os.environ.get("GOCHAN_REDIS_URL") or None
