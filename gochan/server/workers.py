"""``--workers N``: a supervisor and N worker processes on one port.

The supervisor reserves the port (bound, not listening, with SO_REUSEPORT),
forks the workers, and then only watches: each worker is a full node (its
own Streamer, driver connection and HTTP server) listening on the same port
with SO_REUSEPORT, so the kernel spreads new connections over them. A worker
that dies is started again after a backoff that grows while it keeps dying;
SIGTERM or SIGINT is passed on to every worker and waited for (the shutdown
grace plus a margin); a second signal kills them at once.

Connections that name another worker's client are passed to it: see
handoff.py. The in-memory driver cannot be shared by processes, so Config
refuses ``workers > 1`` with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..drivers import Driver
    from ..streamer import Streamer
    from .app import Server

__all__ = ["Supervisor", "WorkerSetup"]

# A worker that dies is started again after this long, doubled each time it
# dies again within WORKER_STABLE_S of starting, up to the maximum.
WORKER_RESTART_MIN_S = 0.5
WORKER_RESTART_MAX_S = 10.0
WORKER_STABLE_S = 30.0
# On shutdown the workers get their shutdown_grace plus this long (closing
# the broker connection) before they are killed.
SHUTDOWN_MARGIN_S = 5.0
POLL_S = 1.0  # the supervisor's longest sleep between looks at its workers
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for the worker when the supervisor dies

log = logging.getLogger("gochan.server")


@dataclasses.dataclass
class WorkerSetup:
    """What a worker is told by the supervisor that forked it."""

    index: int
    directory: str  # the hand-off sockets' private directory
    ready_fd: int  # written once the worker listens

    async def serve(self, streamer: Streamer) -> Server:
        from .handoff import Handoff, owner_tag

        config = streamer.config
        streamer.client_id_prefix = owner_tag(self.index)
        await streamer.start()
        server = streamer._server()
        server.worker_headers = [(b"X-Gochan-Worker", b"%d" % self.index)]
        request_bytes = config.max_url_bytes + config.max_header_bytes + config.max_body_bytes
        handoff = Handoff(self.directory, self.index, config.workers, request_bytes, server.adopt)
        handoff.listen(asyncio.get_running_loop())
        server.handoff = handoff
        server.metrics.registry.register(handoff)
        await server.listen(config.host, config.port, reuse_port=True)
        return server

    def ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"%d\n" % self.index)
            os.close(self.ready_fd)


@dataclasses.dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    backoff: float = WORKER_RESTART_MIN_S
    restart_at: float | None = None  # when it is due to start again


def _set_parent_death_signal() -> None:
    """Linux: the worker gets SIGTERM if the supervisor dies (SIGKILL),
    instead of serving on unsupervised."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind (not listen) ``host:port`` for the workers to share, with
    SO_REUSEPORT; the sockets and the port (chosen here for port 0). A port
    some other process listens on is refused here (EADDRINUSE), by a first
    bind without SO_REUSEPORT, rather than silently shared."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen = set()
    held: list[socket.socket] = []
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            target = (address[0], port, *address[2:])
            with socket.socket(family, kind, proto) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(target)
                port = probe.getsockname()[1]
            sock = socket.socket(family, kind, proto)
            held.append(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address[0], port, *address[2:]))
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held, port


class Supervisor:
    """Starts ``config.workers`` workers, keeps them running, stops them."""

    def __init__(self, config: Config, make_driver: Callable[[], Driver]) -> None:
        self.config = config
        self.make_driver = make_driver
        self.workers = [_Worker(i) for i in range(config.workers)]
        self._signals: list[int] = []
        self._stopping_since: float | None = None
        self._directory = ""
        self._ready: set[int] = set()
        self._listening = False
        self._held: list[socket.socket] = []
        self._closed_fds: tuple[int, ...] = ()  # the supervisor's own, closed in a worker
        self._ready_r = self._ready_w = -1  # the pipe workers say "listening" on

    # -- the supervisor's loop ---------------------------------------------

    def run(self) -> int:
        held, port = reserve_port(self.config.host, self.config.port)
        self.config = self.config.replace(port=port)
        self._directory = tempfile.mkdtemp(prefix="gochan-workers-")  # mode 0700
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC)
        previous = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        handlers = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
        }
        self._held = held
        self._closed_fds = (wake_r, wake_w, self._ready_r)
        try:
            for worker in self.workers:
                self._start(worker)
            return self._watch(wake_r)
        finally:
            self._kill_all()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            for fd in (wake_r, wake_w, self._ready_r, self._ready_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in held:
                sock.close()
            shutil.rmtree(self._directory, ignore_errors=True)

    def _on_signal(self, sig: int, _frame: object) -> None:
        self._signals.append(sig)

    def _watch(self, wake_r: int) -> int:
        grace = self.config.shutdown_grace + SHUTDOWN_MARGIN_S
        while True:
            now = time.monotonic()
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            timeout = min([POLL_S, *[max(0.0, t - now) for t in due]])
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([wake_r, self._ready_r], [], [], timeout)
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                if self._ready_r in readable:
                    self._read_ready()
            signals, self._signals = self._signals, []
            for sig in signals:
                if sig == signal.SIGCHLD:
                    continue
                if self._stopping_since is not None:
                    log.warning("second signal: killing the workers")
                    self._kill_all()
                    return 1
                log.info("stopping %d workers (%s)", len(self.workers), signal.Signals(sig).name)
                self._stopping_since = time.monotonic()
                for worker in self.workers:
                    worker.restart_at = None
                    if worker.pid:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(worker.pid, signal.SIGTERM)
            failed = self._reap()
            if failed is not None:
                return failed
            if self._stopping_since is not None:
                if not any(w.pid for w in self.workers):
                    return 0
                if time.monotonic() - self._stopping_since > grace:
                    log.warning("workers still running %.1f s after SIGTERM: killed", grace)
                    self._kill_all()
                    return 1
                continue
            now = time.monotonic()
            for worker in self.workers:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._start(worker)

    def _read_ready(self) -> None:
        data = os.read(self._ready_r, 4096)
        for word in data.split():
            self._ready.add(int(word))
        if not self._listening and len(self._ready) == len(self.workers):
            self._listening = True
            print(
                f"gochan listening on http://{self.config.host}:{self.config.port} "
                f"(driver {self.config.driver}, {len(self.workers)} workers)",
                flush=True,
            )

    def _reap(self) -> int | None:
        """Collect the workers that ended; None, or the exit code when one
        failed before every worker ever listened (nothing to keep serving)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            worker.pid = 0
            if self._stopping_since is not None:
                continue
            how = (
                f"signal {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
                if os.WIFSIGNALED(status)
                else f"exit code {os.waitstatus_to_exitcode(status)}"
            )
            if not self._listening:
                log.error("worker %d (pid %d) failed to start (%s)", worker.index, pid, how)
                self._kill_all()
                return 1
            if time.monotonic() - worker.started >= WORKER_STABLE_S:
                worker.backoff = WORKER_RESTART_MIN_S
            worker.restart_at = time.monotonic() + worker.backoff
            log.warning(
                "worker %d (pid %d) died (%s); restarting in %.1f s",
                worker.index,
                pid,
                how,
                worker.backoff,
            )
            worker.backoff = min(worker.backoff * 2, WORKER_RESTART_MAX_S)

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(worker.pid, 0)
                worker.pid = 0

    # -- a worker ----------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid:
            worker.pid = pid
            worker.started = time.monotonic()
            log.info("worker %d started (pid %d)", worker.index, pid)
            return
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # Its own process group: a terminal's Ctrl-C reaches the
            # supervisor alone, which passes it on once.
            os.setpgid(0, 0)
            _set_parent_death_signal()
            if os.getppid() != supervisor:
                os._exit(1)  # the supervisor died before the line above
            for fd in self._closed_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for sock in self._held:
                sock.close()  # the supervisor's reservation; the worker binds its own
            code = self._worker_main(worker.index)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def _worker_main(self, index: int) -> int:
        import uvloop

        from .__main__ import run

        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s %(levelname)s %(name)s[w{index}]: %(message)s")
            )
        setup = WorkerSetup(index, self._directory, self._ready_w)
        try:
            uvloop.run(run(self.config, self.make_driver(), setup))
        except OSError as exc:
            print(f"gochan worker {index}: {exc}", file=sys.stderr)
            return 1
        return 0
