"""A nats-server process owned by a test: started on free loopback ports with
JetStream (file storage in a temporary directory) and the HTTP monitoring
endpoint, stoppable and restartable on the SAME ports and store (a broker
outage), and always stopped afterwards."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

from ._process import ServerProcess
from .conftest import free_port, require_binary


class NatsServer(ServerProcess):
    program = "nats-server"

    def __init__(self, config: str | None = None, user: str = "", password: str = "") -> None:
        self.binary = require_binary(self.program)
        super().__init__()
        self.monitor_port = free_port()
        self.store_dir = self.dir / "js"
        self.user = user
        self.password = password
        self.config_path: Path | None = None
        if config is not None:
            self.set_config(config)

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}127.0.0.1:{self.port}"

    def set_config(self, text: str) -> None:
        """Use this configuration file text from the next (re)start on."""
        self.config_path = self.dir / "nats.conf"
        self.config_path.write_text(text)

    def args(self) -> list[str]:
        args = [
            self.binary,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
            "-l", str(self.log_path),
        ]  # fmt: skip
        if self.config_path is not None:
            args += ["-c", str(self.config_path)]
        return args

    def ready(self) -> bool:
        try:
            self.monitor("/healthz")
            return True
        except OSError:
            return False

    def monitor(self, path: str) -> Any:
        """GET a monitoring endpoint (``/connz?subs=1``) as JSON. Blocking."""
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    def subscriptions(self, connection_name: str) -> list[str]:
        """Subjects subscribed by the connections named ``connection_name``."""
        connz = self.monitor("/connz?subs=1&limit=1024")
        subjects: list[str] = []
        for conn in connz.get("connections") or []:
            if conn.get("name") == connection_name:
                subjects.extend(conn.get("subscriptions_list") or [])
        return subjects


def external_url() -> str | None:
    return os.environ.get("GOCHAN_NATS_URL") or None
