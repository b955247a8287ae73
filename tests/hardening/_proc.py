"""A real ``python -m gochan.server`` process for the hardening tests: what a
peer can make it hold is read from /proc (VmRSS), which an in-process server
would share with the test itself."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 15.0
_LISTENING = re.compile(rb"gochan listening on http://([^:]+):(\d+)")


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics."""
        body = get(self.port, "/metrics").decode()
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def get(port: int, path: str, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """GET ``path`` on a fresh connection; the body."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def open_stuck_stream(port: int, target: str, rcvbuf: int = 4096) -> socket.socket:
    """A stream (of ``/events?topic=<target>``, or of ``target`` itself when
    it starts with ``/``) whose reader reads its head and first frame and
    then stops reading; its receive buffer is ``rcvbuf`` bytes."""
    path = target if target.startswith("/") else f"/events?topic={target}"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    sock.settimeout(5)
    head = b""
    while b"\n\n" not in head.partition(b"\r\n\r\n")[2]:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"stream refused: {head!r}")
        head += chunk
    return sock


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes (EOF)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def read_until_cut(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until the server closes or resets the connection, and
    whether it was reset (how a slow consumer is cut)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except ConnectionResetError:
        return data, True
    return data, False


@contextlib.contextmanager
def server_process(tmp_path: Path, *flags: str) -> Iterator[ServerProcess]:
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gochan.server", "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.stdout is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            found = _LISTENING.search(line)
            if found:
                break
            if not line and proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()}")
        else:
            raise AssertionError(f"server did not start: {line!r}")
        yield ServerProcess(proc, int(found.group(2)), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
