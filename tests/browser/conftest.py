"""Real-browser plumbing: headless Chromium (Debian's /usr/bin/chromium)
driven by Playwright's sync API, each test in a fresh profile, against the
1000-topics example server run as a subprocess.

Without Chromium or the playwright package these tests skip with the reason,
except when ``GOCHAN_REQUIRE_BROWSER=1`` (set by CI): then they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Page, Playwright

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "1000topics"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXAMPLE_TOPICS = 50  # topics the example server publishes on
EXAMPLE_INTERVAL_S = 0.1  # each topic once per 0.1 s: 10/s per topic, 500/s in all
# A restart's pages come back within 1..2 s (gochan.js waits the server's
# shutdown delay; the default window is 1..30 s).
EXAMPLE_SHUTDOWN_RETRY_MAX_S = 2.0
START_TIMEOUT_S = 15.0

# Records every EventSource the page opens (and when: createdAt, from
# performance.now()), so a test can listen on the wire itself (what the
# server sends), not only through gochan.js.
WIRE_RECORDER = """
(() => {
  const Native = window.EventSource;
  window.__sources = [];
  window.EventSource = class extends Native {
    constructor(url, init) {
      super(url, init);
      this.createdAt = performance.now();
      window.__sources.push(this);
    }
  };
})();
"""


def browser_unavailable(reason: str) -> NoReturn:
    if os.environ.get("GOCHAN_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser required (GOCHAN_REQUIRE_BROWSER=1) but unavailable: {reason}")
    pytest.skip(reason)


def chromium_executable() -> str:
    """Debian's chromium, or the browser named by GOCHAN_CHROMIUM."""
    wanted = os.environ.get("GOCHAN_CHROMIUM")
    for candidate in [wanted] if wanted else ["chromium", "chromium-browser"]:
        path = shutil.which(candidate)
        if path:
            return path
    browser_unavailable(f"{wanted or 'chromium'} is not installed (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Module scope, not session: while Playwright's sync driver runs, its event
# loop counts as running in this thread, and the async tests elsewhere in the
# suite could not start theirs.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable("the playwright package is not installed (pip install playwright)")
    executable = chromium_executable()  # skip before starting the driver
    del executable
    pw = sync_playwright().start()
    try:
        yield pw
    finally:
        pw.stop()


class BrowserSession:
    """One page in a fresh Chromium profile, with every console error and
    uncaught page error it produced."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.page: Page = context.pages[0] if context.pages else context.new_page()
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(f"{message.text} ({message.location.get('url', '')})")

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    def wait_js(self, expression: str, arg: Any = None, timeout: float = 10.0) -> None:
        """Wait until the JS function ``expression`` returns something truthy."""
        self.page.wait_for_function(expression, arg=arg, timeout=timeout * 1000)

    def assert_no_errors(self, allow: str | None = None) -> None:
        """No uncaught exception, and no console error but those matching ``allow``."""
        assert not self.page_errors, self.page_errors
        errors = [e for e in self.console_errors if not (allow and re.search(allow, e))]
        assert not errors, errors


@pytest.fixture
def browser(playwright: Playwright, tmp_path: Path) -> Iterator[BrowserSession]:
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path / "profile"),  # a fresh user-data-dir for every test
        executable_path=chromium_executable(),
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 860},
    )
    context.add_init_script(WIRE_RECORDER)
    try:
        yield BrowserSession(context)
    finally:
        context.close()


class Process:
    """A server subprocess that prints a banner line once it listens."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"{self.argv} did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


class ExampleServer(Process):
    """examples/1000topics/server.py: gochan with its own publisher (every
    topic once per interval), serving the page at /. ``defaults``: only the
    port is given, as a new user would run it."""

    def __init__(
        self,
        port: int,
        log: Path,
        *,
        defaults: bool = False,
        topics: int = EXAMPLE_TOPICS,
        interval: float = EXAMPLE_INTERVAL_S,
    ) -> None:
        argv = [sys.executable, str(EXAMPLE / "server.py"), "--port", str(port)]
        if not defaults:
            argv += ["--topics", str(topics), "--interval", str(interval)]
            argv += ["--shutdown-retry-max", str(EXAMPLE_SHUTDOWN_RETRY_MAX_S)]
        super().__init__(argv, log)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def restart(self, down_s: float = 0.3) -> None:
        """Stop the server (its streams get "Client closed"), stay down a
        moment, then start a new one on the same port: it knows no client."""
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def example(tmp_path: Path) -> Iterator[ExampleServer]:
    server = ExampleServer(free_port(), tmp_path / "example-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def example_defaults(tmp_path: Path) -> Iterator[ExampleServer]:
    """The example server exactly as the README starts it, on a free port."""
    server = ExampleServer(free_port(), tmp_path / "example-server.log", defaults=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gochan_server(tmp_path: Path) -> Iterator[Any]:
    """A factory: plain ``python -m gochan.server`` with the given flags, on
    a free port or on ``port`` (to restart a server where it was)."""
    started: list[Process] = []

    def start(*flags: str, port: int | None = None) -> tuple[str, Process]:
        port = port or free_port()
        argv = [sys.executable, "-m", "gochan.server", "--port", str(port), *flags]
        proc = Process(argv, tmp_path / f"gochan-{port}-{len(started)}.log")
        proc.start()
        started.append(proc)
        return f"http://127.0.0.1:{port}", proc

    try:
        yield start
    finally:
        for proc in started:
            with contextlib.suppress(Exception):
                proc.stop()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class TcpProxy:
    """A loopback TCP relay in front of a server, whose connections a test
    can cut (like a proxy or a network drop) while the server stays up."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so the accept loop sees close()
        self.closed = False
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.sockets: set[socket.socket] = set()  # live relayed connections
        self.every: list[socket.socket] = []  # closed by close()
        self.lock = threading.Lock()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.update((client, upstream))
                self.every += (client, upstream)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every relayed connection at once."""
        with self.lock:
            sockets, self.sockets = self.sockets, set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()
        for s in self.every:
            s.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Any]:
    """A factory: ``tcp_proxy(port)`` relays to 127.0.0.1:port."""
    proxies: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        proxies.append(TcpProxy(port))
        return proxies[-1]

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()
