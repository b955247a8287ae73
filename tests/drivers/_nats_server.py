"""A nats-server process owned by a test: started on free loopback ports with
JetStream (file storage in a temporary directory) and the HTTP monitoring
endpoint, stoppable and restartable on the SAME ports and store (a broker
outage), and always stopped afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import free_port, require_binary, start_process, stop_process

START_TIMEOUT_S = 15.0


class NatsServer:
    def __init__(self, config: str | None = None, user: str = "", password: str = "") -> None:
        self.binary = require_binary("nats-server")
        self.port = free_port()
        self.monitor_port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="gochan-nats-")
        self.store_dir = Path(self._tmp.name) / "js"
        self.log_path = Path(self._tmp.name) / "nats.log"
        self.user = user
        self.password = password
        self.config_path: Path | None = None
        if config is not None:
            self.set_config(config)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user else ""
        return f"nats://{auth}127.0.0.1:{self.port}"

    def set_config(self, text: str) -> None:
        """Use this configuration file text from the next (re)start on."""
        self.config_path = Path(self._tmp.name) / "nats.conf"
        self.config_path.write_text(text)

    def start(self) -> None:
        assert self.proc is None, "already running"
        args = [
            self.binary,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-m",
            str(self.monitor_port),
            "-js",
            "-sd",
            str(self.store_dir),
            "-l",
            str(self.log_path),
        ]
        if self.config_path is not None:
            args += ["-c", str(self.config_path)]
        try:
            self.proc = start_process(args, self.port, START_TIMEOUT_S, self._healthy)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{self.log()}") from None

    def _healthy(self) -> bool:
        try:
            self.monitor("/healthz")
            return True
        except OSError:
            return False

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
