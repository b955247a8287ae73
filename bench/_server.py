"""The server process for the whole-server benchmarks (soak.py, attacks.py):
a free loopback port, the source tree to run (the working tree, or a commit
exported and built once under bench/results/), starting ``python -m
gochan.server`` in its own session with its output captured, stopping it, and
reading its VmRSS, descriptors and CPU time from /proc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

SERVER_START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
BUILD_TIMEOUT_S = 600.0

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def source_tree(rev: str | None, log: Log = _stderr_log) -> Path:
    """The directory the server runs in: the working tree, or ``rev`` exported
    with ``git archive`` and installed (``pip install --target``, which builds
    the extension) under bench/results/src-<sha>/, once per commit, so that
    edits made to the working tree meanwhile do not reach the server."""
    if rev is None:
        return ROOT
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    src = RESULTS / f"src-{sha[:12]}"
    site = src / "site"
    if not list(site.glob("gochan/_fast/core*.so")):
        log(f"exporting {rev} ({sha[:12]}) to {src} and building it")
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
        subprocess.run([*pip, str(site), str(src)], check=True, timeout=BUILD_TIMEOUT_S)
    return site


def server_command(port: int, flags: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gochan.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]


def accepts_flags(tree: Path, flags: Sequence[str]) -> bool:
    """Whether the gochan in ``tree`` knows ``flags`` (``--check-config`` with
    them exits 0): a flag newer than an old revision under test is left out."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "gochan.server", "--check-config", *flags],
        cwd=tree,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode == 0


def start_server(
    cmd: Sequence[str],
    tree: Path,
    port: int,
    stdout: IO[Any],
    stderr: IO[Any] | int = subprocess.STDOUT,
    timeout: float = SERVER_START_TIMEOUT_S,
) -> subprocess.Popen[Any]:
    """Start ``cmd`` with ``tree`` first on the path, in a session of its own
    (``stop_process`` signals the group), and wait until ``port`` accepts.
    Raises RuntimeError, the process stopped, if it exits or never listens."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        list(cmd), cwd=tree, env=env, stdout=stdout, stderr=stderr, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"server not listening after {timeout:g} s")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any], log: Log = _stderr_log) -> None:
    """SIGTERM, then SIGKILL after a bounded wait; the process group goes too."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            log(f"server did not exit after {sig.name}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
