"""Broker processes the driver tests run themselves: started on a loopback
port until they accept connections, stopped (SIGKILL if they linger),
restarted on the SAME port for an outage."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .conftest import broker_unavailable, free_port, port_open

STOP_TIMEOUT_S = 10.0
FREEZE_TIMEOUT_S = 5.0
LOG_TAIL_CHARS = 4000

_S = TypeVar("_S", bound="ServerProcess")


def start_process(
    args: list[str],
    port: int,
    timeout: float,
    ready: Callable[[], bool] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start a broker and wait until it accepts connections on 127.0.0.1:``port``
    (and ``ready()`` holds); RuntimeError, the process stopped, if it exits
    or takes longer than ``timeout`` seconds. Its output is discarded unless
    ``popen`` says otherwise."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(args, **popen)
    deadline = time.monotonic() + timeout
    while not (port_open("127.0.0.1", port, 0.2) and (ready is None or ready())):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"{os.path.basename(args[0])} did not start")
        time.sleep(0.05)
    return proc


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S
) -> None:
    """Stop a broker with ``sig`` (resumed first, in case a test paused it);
    SIGKILL if it is still there after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServerProcess:
    """A broker process owned by a test, on a free loopback port, with a
    temporary directory for its files and log; always stopped afterwards.

    A subclass names its ``program`` and gives its command line (``args``)
    and, if the open port is not enough, a ``ready`` probe.
    """

    program: ClassVar[str]
    start_timeout_s: ClassVar[float] = 15.0

    def __init__(self) -> None:
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"gochan-{self.program}-")
        self.dir = Path(self._tmp.name)
        self.log_path = self.dir / f"{self.program}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def running(cls: type[_S]) -> Iterator[_S]:
        """For fixtures (``yield from``): a started server, or the test skips
        or fails (:func:`broker_unavailable`); closed afterwards."""
        try:
            server = cls()
            server.start()
        except (OSError, RuntimeError) as exc:
            broker_unavailable(f"cannot start {cls.program}: {exc}")
        try:
            yield server
        finally:
            server.close()

    def args(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        assert self.proc is None, "already running"
        try:
            self.proc = start_process(self.args(), self.port, self.start_timeout_s, self.ready)
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

    def freeze(self) -> None:
        """SIGSTOP, and return only once every thread of the server is stopped.

        ``kill`` returns before a thread running on another core has taken the
        signal, so a command written right after it could still be answered
        (CI saw a publish acknowledged by a "frozen" NATS)."""
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while not all(state in "Tt" for state in thread_states(self.proc.pid)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.program} did not stop on SIGSTOP")
            time.sleep(0.001)

    def thaw(self) -> None:
        assert self.proc is not None, "not running"
        self.proc.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "<no log>"


def thread_states(pid: int) -> list[str]:
    """The state letter (``/proc/<pid>/task/<tid>/stat``) of each thread."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):
            # "tid (comm) S ...": comm may hold spaces and parentheses.
            states.append(stat.read_text().rpartition(")")[2].split()[0])
    return states
