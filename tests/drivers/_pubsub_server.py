"""The Google Cloud Pub/Sub emulator for the driver tests, on a free loopback
port, stoppable and restartable on the SAME port (an outage, after which it
has forgotten every topic and subscription).

The emulator comes with the Google Cloud CLI (``cloud-pubsub-emulator`` under
the SDK's ``platform/pubsub-emulator``; it needs Java). Set
``GOCHAN_PUBSUB_EMULATOR_HOST=host:port`` to use a running one instead (it
cannot be restarted).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp

from ._process import start_process, stop_process
from .conftest import (
    broker_unavailable,
    free_port,
    import_or_skip,
)

PROJECT = "gochan-test"
EMULATOR_REL = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
SDK_ROOTS = [
    Path("/usr/lib/google-cloud-sdk"),
    Path("/usr/share/google-cloud-sdk"),
    Path("/opt/google-cloud-sdk"),
]
START_TIMEOUT_S = 45.0
PUBLISH_TIMEOUT_S = 15.0


def find_emulator() -> Path | None:
    on_path = shutil.which("cloud-pubsub-emulator")
    if on_path:
        return Path(on_path)
    roots = list(SDK_ROOTS)
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.insert(0, Path(gcloud).resolve().parent.parent)
    for root in roots:
        if (root / EMULATOR_REL).is_file():
            return root / EMULATOR_REL
    return None


class Emulator:
    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        # The launcher script execs java, so the pid is the JVM's.
        self.proc = start_process(
            [str(self.binary), "--host=127.0.0.1", f"--port={self.port}"],
            self.port,
            START_TIMEOUT_S,
            start_new_session=True,
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, signal.SIGKILL)  # like a crash; it keeps nothing anyway


@dataclass
class PubSubServer:
    host: str
    emulator: Emulator | None

    def publish(self, topic_id: str, data: bytes) -> str:
        """Publish with Google's own client library (blocking), not the driver;
        creates the topic when it is missing."""
        pubsub_v1 = import_or_skip("google.cloud.pubsub_v1")
        old = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        try:
            publisher = pubsub_v1.PublisherClient()
            path = publisher.topic_path(PROJECT, topic_id)
            try:
                publisher.create_topic(name=path)
            except Exception as exc:  # AlreadyExists
                if "exists" not in str(exc).lower():
                    raise
            message_id: str = publisher.publish(path, data).result(timeout=PUBLISH_TIMEOUT_S)
            publisher.stop()
            publisher.transport.close()
            return message_id
        finally:
            if old is None:
                del os.environ["PUBSUB_EMULATOR_HOST"]
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = old

    async def subscriptions(self, topic_id: str) -> list[str]:
        """The subscriptions of a topic, as the service lists them (plain REST)."""
        url = f"http://{self.host}/v1/projects/{PROJECT}/topics/{quote(topic_id, safe='')}"
        async with aiohttp.ClientSession() as session, session.get(url + "/subscriptions") as resp:
            resp.raise_for_status()
            listed = await resp.json()
        return sorted(listed.get("subscriptions", []))

    def stop(self) -> None:
        if self.emulator is not None:
            self.emulator.stop()


def obtain() -> PubSubServer:
    host = os.environ.get("GOCHAN_PUBSUB_EMULATOR_HOST")
    if host:
        return PubSubServer(host, None)
    binary = find_emulator()
    if binary is None:
        broker_unavailable(
            "the Pub/Sub emulator (google-cloud-cli's pubsub-emulator) is not installed"
        )
    if shutil.which("java") is None:
        broker_unavailable("the Pub/Sub emulator needs java")
    try:
        emulator = Emulator(binary)
    except (OSError, RuntimeError) as exc:
        broker_unavailable(f"cannot start the Pub/Sub emulator: {exc}")
    return PubSubServer(emulator.host, emulator)
