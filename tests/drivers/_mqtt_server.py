"""MQTT brokers for the driver tests.

:func:`obtain` finds the broker for ordinary tests: ``GOCHAN_MQTT_URL``
(``mqtt://[user:password@]host[:port]``) if set; else Mosquitto on
127.0.0.1:1883 if it answers; else a Mosquitto of our own.

:class:`Mosquitto` is a broker of our own on a free port, for what must not
be done to a shared one: killing and restarting it, reading its log to see
subscriptions come and go from the broker's side.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote, urlsplit

from ._process import start_process, stop_process
from .conftest import broker_unavailable, free_port, port_open

START_TIMEOUT_S = 10.0


@dataclass
class MqttBroker:
    host: str
    port: int
    username: str = ""
    password: str = ""
    own: Mosquitto | None = None

    def driver_options(self) -> dict[str, object]:
        return {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
        }


class Mosquitto:
    """A Mosquitto process of our own, on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
        )
        if binary is None:
            broker_unavailable("mosquitto is not installed")
        self.binary = binary
        self.port = free_port()
        self.tmpdir = tempfile.mkdtemp(prefix="gochan-mosquitto-")
        self.config = os.path.join(self.tmpdir, "mosquitto.conf")
        self.log_path = os.path.join(self.tmpdir, "mosquitto.log")
        with open(self.config, "w") as f:
            f.write(
                f"listener {self.port} 127.0.0.1\n"
                "allow_anonymous true\n"
                "persistence false\n"
                "log_dest stderr\n"  # unbuffered; a file would be opened as user mosquitto
                "log_type error\nlog_type warning\nlog_type notice\n"
                "log_type information\nlog_type subscribe\nlog_type unsubscribe\n"
            )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start (again, on the same port) and wait until it accepts connections."""
        assert self.process is None
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        try:
            self.process = start_process(
                [self.binary, "-c", self.config],
                self.port,
                START_TIMEOUT_S,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except RuntimeError as exc:
            self._close_log()
            broker_unavailable(f"{exc}: {self.log()[-500:]}")

    def kill(self) -> None:
        """A crash: SIGKILL, every connection dropped at once."""
        self._reap(signal.SIGKILL)

    def stop(self) -> None:
        self._reap(signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _reap(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, sig)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def subscriptions(self, client_id: str) -> list[tuple[str, str]]:
        """("subscribe"|"unsubscribe", topic) for ``client_id``, from the log, in order."""
        events = []
        for line in self.log().splitlines():
            _, _, rest = line.partition(": ")
            if not rest.startswith(client_id + " "):
                continue
            qos, _, topic = rest[len(client_id) + 1 :].partition(" ")
            if qos in ("0", "1", "2") and topic:
                events.append(("subscribe", topic))
            else:
                events.append(("unsubscribe", rest[len(client_id) + 1 :]))
        return events

    def topic_subscribed(self, topic: str) -> bool:
        """Whether some client holds a subscription to ``topic``, from the log."""
        holders: set[str] = set()
        for line in self.log().splitlines():
            _, _, rest = line.partition(": ")
            if not rest.endswith(" " + topic):
                continue
            words = rest[: -len(topic) - 1].split(" ")
            if len(words) == 2 and words[1] in ("0", "1", "2"):
                holders.add(words[0])  # "<client> <qos> <topic>": SUBSCRIBE
            elif len(words) == 1:
                holders.discard(words[0])  # "<client> <topic>": UNSUBSCRIBE
        return bool(holders)

    def broker(self) -> MqttBroker:
        return MqttBroker(host="127.0.0.1", port=self.port, own=self)


def obtain() -> MqttBroker:
    url = os.environ.get("GOCHAN_MQTT_URL")
    if url:
        parts = urlsplit(url)
        return MqttBroker(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 1883,
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )
    if port_open("127.0.0.1", 1883):
        return MqttBroker(host="127.0.0.1", port=1883)
    own = Mosquitto()
    own.start()
    return own.broker()
