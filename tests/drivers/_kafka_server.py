"""A Kafka test broker: librdkafka's mock cluster, run in its own process.

There is no Apache Kafka here, but librdkafka (bundled in the confluent-kafka
wheel) carries a mock cluster that speaks the real Kafka protocol on a real
loopback port. confluent-kafka's Python API only exposes it through the
``test.mock.num.brokers`` setting and keeps the cluster handle to itself, so
this module drives the C API through ctypes instead; that also gives us
``rd_kafka_mock_broker_set_down``/``set_up``, which drop every connection and
refuse new ones, then accept again on the SAME port: a broker outage.

Run as ``python -m tests.drivers._kafka_server``. It prints ``BOOTSTRAP
host:port`` on stdout, then obeys one command per stdin line: ``topic NAME
PARTITIONS``, ``down``, ``up``, ``quit`` (EOF also quits), and answers each
with ``ok`` or ``error ...``. :class:`MockKafka` runs it for the tests;
:func:`obtain` gives ``$GOCHAN_KAFKA_URL`` instead when set (a real broker,
without the down/up switch).
"""

from __future__ import annotations

import ctypes
import glob
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conftest import broker_unavailable

START_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 5.0
PRODUCE_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[2]

RD_KAFKA_PRODUCER = 0
BROKER_ID = 1  # the mock numbers its brokers from 1
ERRSTR_SIZE = 512


def load_librdkafka() -> ctypes.CDLL:
    import confluent_kafka

    libs_dir = os.path.join(
        os.path.dirname(os.path.dirname(confluent_kafka.__file__)), "confluent_kafka.libs"
    )
    candidates = sorted(glob.glob(os.path.join(libs_dir, "librdkafka*.so*")))
    if not candidates:
        raise OSError(f"no bundled librdkafka in {libs_dir}")
    lib = ctypes.CDLL(candidates[0])
    vp = ctypes.c_void_p
    lib.rd_kafka_conf_new.restype = vp
    lib.rd_kafka_conf_set.argtypes = [
        vp,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_new.restype = vp
    lib.rd_kafka_new.argtypes = [ctypes.c_int, vp, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_mock_cluster_new.restype = vp
    lib.rd_kafka_mock_cluster_new.argtypes = [vp, ctypes.c_int]
    lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [vp]
    lib.rd_kafka_mock_broker_set_down.argtypes = [vp, ctypes.c_int32]
    lib.rd_kafka_mock_broker_set_up.argtypes = [vp, ctypes.c_int32]
    lib.rd_kafka_mock_topic_create.argtypes = [vp, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [vp]
    lib.rd_kafka_destroy.argtypes = [vp]
    return lib


def main() -> int:
    lib = load_librdkafka()
    errstr = ctypes.create_string_buffer(ERRSTR_SIZE)
    conf = lib.rd_kafka_conf_new()
    # Keep the owning handle quiet: it never connects anywhere.
    lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, ERRSTR_SIZE)
    rk = lib.rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, ERRSTR_SIZE)
    if not rk:
        print(f"error {errstr.value.decode()}", flush=True)
        return 1
    mcluster = lib.rd_kafka_mock_cluster_new(rk, 1)
    if not mcluster:
        print("error rd_kafka_mock_cluster_new failed", flush=True)
        return 1
    print(f"BOOTSTRAP {lib.rd_kafka_mock_cluster_bootstraps(mcluster).decode()}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "quit":
            break
        if cmd == "down":
            err = lib.rd_kafka_mock_broker_set_down(mcluster, BROKER_ID)
        elif cmd == "up":
            err = lib.rd_kafka_mock_broker_set_up(mcluster, BROKER_ID)
        elif cmd == "topic" and len(words) == 3:
            err = lib.rd_kafka_mock_topic_create(mcluster, words[1].encode(), int(words[2]), 1)
        else:
            print(f"error unknown command {line.strip()!r}", flush=True)
            continue
        print("ok" if err == 0 else f"error code {err}", flush=True)
    lib.rd_kafka_mock_cluster_destroy(mcluster)
    lib.rd_kafka_destroy(rk)
    return 0


# -- the tests' side -----------------------------------------------------------


class MockKafka:
    """This module running as a child process: the cluster and its switches."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.drivers._kafka_server"],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._readline(START_TIMEOUT_S)
        if not line.startswith("BOOTSTRAP "):
            self.stop()
            raise RuntimeError(f"mock Kafka did not start: {line!r}")
        self.bootstrap = line.split()[1]

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("mock Kafka did not answer")
        return self.proc.stdout.readline().strip()

    def command(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        answer = self._readline(COMMAND_TIMEOUT_S)
        assert answer == "ok", f"mock Kafka: {cmd!r} -> {answer!r}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class KafkaServer:
    bootstrap: str
    mock: MockKafka | None

    def produce(self, ktopic: str, value: bytes, key: bytes | None = None) -> tuple[int, int]:
        """Produce with an ordinary Kafka client (librdkafka; blocking), not the
        driver; returns the record's partition and offset."""
        import confluent_kafka

        producer = confluent_kafka.Producer({"bootstrap.servers": self.bootstrap})
        result: list[Any] = []
        producer.produce(
            ktopic, value, key=key, on_delivery=lambda err, msg: result.append((err, msg))
        )
        producer.flush(PRODUCE_TIMEOUT_S)
        err, msg = result[0]
        assert err is None, err
        return msg.partition(), msg.offset()

    def create_topic(self, ktopic: str, partitions: int) -> None:
        """Create a Kafka topic (the mock's own command; an admin request on a
        real broker)."""
        if self.mock is not None:
            self.mock.command(f"topic {ktopic} {partitions}")
            return
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for future in admin.create_topics([NewTopic(ktopic, partitions)]).values():
            future.result(PRODUCE_TIMEOUT_S)

    def stop(self) -> None:
        if self.mock is not None:
            self.mock.stop()


def obtain() -> KafkaServer:
    url = os.environ.get("GOCHAN_KAFKA_URL")
    if url:
        return KafkaServer(url.removeprefix("kafka://"), None)
    try:
        mock = MockKafka()
    except (OSError, RuntimeError, TimeoutError) as exc:
        broker_unavailable(f"cannot start librdkafka's mock Kafka cluster: {exc}")
    return KafkaServer(mock.bootstrap, mock)


if __name__ == "__main__":
    sys.exit(main())
