"""Hypothesis fuzzing of the HTTP parser and every endpoint, against ONE real
server over real sockets.

The server is ``python -m gochan.server --port 0`` in a subprocess (the mem
driver; a static dir so unknown GET paths reach the file server), started once
for the module; its stderr goes to a file that must never show a traceback.
Beside the fuzzer, a healthy client holds a stream on the topic ``healthy``
and a well-formed publisher sends it a numbered message every few cases; at
each checkpoint the stream must have received every one of them, in order,
and nothing else (its first frame, heartbeats, ``healthy`` frames).

Each case is a list of requests (built from the endpoints' grammar, maybe
mutated, or raw malformed bytes) written on a new connection in one or several
writes, then half-closed. The answer must be well-formed HTTP/1.1 responses,
one per request the same parser (httptools) finds complete, no 5xx but 503,
or a close; never a hang. The tests are synchronous (Hypothesis drives them;
the server is another process), with blocking sockets and short timeouts.

``GOCHAN_FUZZ_EXAMPLES`` scales the number of cases (default: about a minute
in the suite); ``GOCHAN_FUZZ_SEED`` picks a seed (default: derandomized).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import httptools
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("GOCHAN_FUZZ_EXAMPLES", "3000"))
SEED = os.environ.get("GOCHAN_FUZZ_SEED")
SHRINK = os.environ.get("GOCHAN_FUZZ_SHRINK") == "1"
# Record failures and go on (reported at the end) rather than stop at the first.
KEEP_GOING = os.environ.get("GOCHAN_FUZZ_KEEP_GOING") == "1"
PROGRESS = os.environ.get("GOCHAN_FUZZ_PROGRESS")  # a file: the case count, kept current
CASE_TIMEOUT_S = 5.0  # no answer and no close by then: the server hangs
CHECK_EVERY = 25  # cases between healthy publishes and /healthz probes
HEALTHY = "healthy"
SECRET = b"gochan-fuzz-secret-outside-the-static-dir"
# The server's defaults (gochan/config.py); the limit cases aim around them.
MAX_URL = 8 * 1024
MAX_HEADER_BYTES = 16 * 1024
MAX_HEADERS = 100
MAX_BODY = 1024 * 1024

pytestmark = pytest.mark.timeout(120 + EXAMPLES // 10)

ROUTES = {
    "/events": {"GET", "HEAD"},
    "/update_subscriptions": {"POST"},
    "/publish": {"POST"},
    "/healthz": {"GET", "HEAD"},
    "/readyz": {"GET", "HEAD"},
    "/metrics": {"GET", "HEAD"},
    "/gochan.js": {"GET", "HEAD"},
}
# Every header the server may send; anything else was injected.
RESPONSE_HEADERS = {
    "server",
    "date",
    "content-type",
    "content-length",
    "connection",
    "allow",
    "cache-control",
    "x-accel-buffering",
    "www-authenticate",
    "vary",
    "access-control-allow-origin",
    "access-control-allow-credentials",
    "access-control-allow-methods",
    "access-control-allow-headers",
    "access-control-max-age",
}
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ([\x20-\x7e]*)")


def profile(n: int) -> Any:
    """Hypothesis settings for a test given ``n`` of this file's examples."""
    return settings(
        max_examples=max(1, n),
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
        # Shrinking against a live server is slow: on demand (GOCHAN_FUZZ_SHRINK=1).
        phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    )


def seeded(test: Callable[..., None]) -> Callable[..., None]:
    return seed(int(SEED))(test) if SEED is not None else test


# -- the server and the healthy stream --------------------------------------


class Failure(AssertionError):
    pass


@dataclass
class Known:
    """Inputs that hit a defect already being fixed elsewhere: counted, not failed."""

    nul_static_path: int = 0  # GET /%00 with a static dir: 500
    replaced_utf8_topic: int = 0  # ?topic=%FF becomes U+FFFD
    early_continue: int = 0  # pipelined Expect: 100-continue answered out of order


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    stderr: Path
    healthy: HealthyStream
    publisher: socket.socket
    client_ids: list[str]
    published: int = 0
    cases: int = 0
    known: Known = field(default_factory=Known)
    failures: dict[str, str] = field(default_factory=dict)  # kind -> first case (KEEP_GOING)
    verified: bool = False  # by test_server_survived (else the fixture's teardown checks)

    def request(self, sock: socket.socket, data: bytes) -> tuple[int, bytes]:
        """One keep-alive request/response on ``sock`` (well-formed, ours)."""
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise Failure(f"connection closed answering {data!r}: {buf!r}")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise Failure("connection closed mid-body")
            body += chunk
        return int(head.split(b" ")[1]), body

    def checkpoint(self) -> None:
        """Publish the next healthy message, probe /healthz, check the server."""
        if PROGRESS:
            failures = "".join(f"\n{v}\n" for v in self.failures.values())
            Path(PROGRESS).write_text(f"{self.cases} cases, {self.known}\n{failures}")
        if self.process.poll() is not None:
            raise Failure(f"server exited ({self.process.returncode}): {self.stderr_text()}")
        body = b"healthy-%d" % self.published
        status, answer = self.request(
            self.publisher,
            b"POST /publish?topic=healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        if status != 200 or b'"id"' not in answer:
            raise Failure(f"healthy publish answered {status} {answer!r}")
        self.published += 1
        status, answer = self.request(
            self.publisher, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        )
        if (status, answer) != (200, b"ok\n"):
            raise Failure(f"/healthz answered {status} {answer!r}")

    def verify(self) -> None:
        """Everything published to ``healthy`` arrived, in order, and nothing else."""
        self.checkpoint()
        self.healthy.wait_for(self.published)
        self.healthy.check(self.published)
        if self.failures:
            raise Failure("failures:\n" + "\n".join(self.failures.values()))
        text = self.stderr_text()
        tracebacks = [t for t in text.split("Traceback")[1:] if not known_traceback(t)]
        if tracebacks:
            raise Failure(f"traceback in the server's stderr:\n{text}")

    def stderr_text(self) -> str:
        return self.stderr.read_text(errors="replace")


def known_traceback(text: str) -> bool:
    # The static file server's known defect: a NUL in the unquoted path.
    return "ValueError: embedded null byte" in text.split("\n\n")[0] and "static" in text


class HealthyStream:
    """A real client on ``/events?topic=healthy``: a thread keeps every byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"GET /events?topic=healthy HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        self.data = b""
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.sock.settimeout(None)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                with self.lock:
                    self.data += chunk

    def frames(self) -> list[bytes]:
        with self.lock:
            data = self.data
        head, sep, body = data.partition(b"\r\n\r\n")
        if not sep:
            return []
        if not head.startswith(b"HTTP/1.1 200 ") or b"text/event-stream" not in head:
            raise Failure(f"healthy stream answered {head!r}")
        return [f + b"\n\n" for f in body.split(b"\n\n")[:-1]]

    def messages(self) -> list[str]:
        return [f.split(b"\ndata: ", 1)[1][:-2].decode() for f in self.frames() if is_data(f)]

    def wait_for(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages()) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def check(self, n: int) -> None:
        frames = self.frames()
        if not frames or not frames[0].startswith(b"event: message\ndata: {"):
            raise Failure(f"healthy stream's first frame: {frames[:1]!r}")
        first = orjson.loads(frames[0][len(b"event: message\ndata: ") : -2])
        if first["subscriptions"] != [HEALTHY]:
            raise Failure(f"healthy stream's first frame: {first!r}")
        for frame in frames[1:]:
            if frame != b":\n\n" and not is_data(frame):
                raise Failure(f"healthy stream received a frame nobody sent it: {frame!r}")
        got = self.messages()
        expected = [f"healthy-{i}" for i in range(n)]
        if got != expected:
            missing = sorted(set(expected) - set(got))
            raise Failure(f"healthy stream: {len(got)} of {n} messages; missing {missing[:10]}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


DATA_FRAME = re.compile(rb"event: healthy\nid: [!-~]+\ndata: healthy-[0-9]+\n\n")


def is_data(frame: bytes) -> bool:
    return DATA_FRAME.fullmatch(frame) is not None


def open_client(port: int) -> str:
    """A client of the fuzzer's own (an id it may use), created by a stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /events?topic=fz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        buf = b""
        while b"\n\n" not in buf.partition(b"\r\n\r\n")[2]:
            buf += sock.recv(65536)
    first = buf.partition(b"\r\n\r\n")[2].split(b"\ndata: ", 1)[1].split(b"\n")[0]
    return str(orjson.loads(first)["config"]["client_id"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    static = root / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_bytes(b"<p>index</p>")
    (static / "sub" / "a.txt").write_bytes(b"a")
    (root / "secret.txt").write_bytes(SECRET)
    stderr = root / "stderr.log"
    with stderr.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gochan.server", "--port", "0", "--heartbeat", "1",
             "--client-ttl", "3600", "--static-dir", str(static),
             # One address sends every case, thousands a second: the connection
             # rate limit (tests/ops/test_connection_rate.py) would answer most.
             "--connection-rate-per-peer", "0"],
            stdout=subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
    sockets: list[Any] = []
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"no port in {line!r}: {stderr.read_text()}"
        port = int(match.group(1))
        healthy = HealthyStream(port)
        sockets.append(healthy)
        publisher = socket.create_connection(("127.0.0.1", port), timeout=5)
        sockets.append(publisher)
        srv = Server(port, process, stderr, healthy, publisher, [open_client(port) for _ in "abc"])
        deadline = time.monotonic() + 5
        while not healthy.frames() and time.monotonic() < deadline:
            time.sleep(0.01)
        yield srv
        print(f"\ngochan fuzz: {srv.cases} cases, {srv.published} healthy messages, {srv.known}")
        if not srv.verified:
            srv.verify()
    finally:
        for sock in sockets:
            sock.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


# -- one case: write, read, judge --------------------------------------------


@dataclass
class Sent:
    """What the same parser the server uses makes of the bytes of a case."""

    methods: list[str] = field(default_factory=list)
    keep_alive: list[bool] = field(default_factory=list)
    urls: list[bytes] = field(default_factory=list)
    headers: list[dict[bytes, bytes]] = field(default_factory=list)
    error: bool = False
    ended: bool = False

    def __post_init__(self) -> None:
        self._headers: dict[bytes, bytes] = {}
        self._url = b""
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._headers = {}
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_message_complete(self) -> None:
        self.methods.append(self.parser.get_method().decode("latin-1"))
        self.keep_alive.append(self.parser.should_keep_alive())
        self.urls.append(self._url)
        self.headers.append(self._headers)
        if not self.keep_alive[-1]:
            self.ended = True  # what follows is never read (httptools refuses it)

    @classmethod
    def parse(cls, data: bytes) -> Sent:
        sent = cls()
        try:
            sent.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            sent.error = not sent.ended
        return sent


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    first_frame: bytes = b""  # of an event stream


@dataclass
class Outcome:
    answers: list[Answer]
    interim: list[int]  # positions (in answers) of 1xx responses, by arrival
    closed: bool


def parse_answer(buf: bytes, method: str | None) -> tuple[Answer | None, int]:
    """One response from the front of ``buf``: (answer, bytes used), or
    (None, 0) while incomplete. Raises Failure when malformed."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536 or (buf and not b"HTTP/1.1 ".startswith(buf[:9])):
            raise Failure(f"malformed response head: {buf[:300]!r}")
        return None, 0
    lines = buf[:end].split(b"\r\n")
    status_match = STATUS_LINE.fullmatch(lines[0])
    if status_match is None:
        raise Failure(f"malformed status line: {lines[0]!r}")
    status = int(status_match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        match = HEADER_LINE.fullmatch(line)
        if match is None:
            raise Failure(f"malformed response header: {line!r}")
        name = match.group(1).decode().lower()
        if name not in RESPONSE_HEADERS:
            raise Failure(f"unexpected response header: {line!r}")
        if name in headers:
            raise Failure(f"repeated response header: {line!r}")
        headers[name] = match.group(2).decode()
    rest = end + 4
    if status < 200:
        return Answer(status, headers, b""), rest
    close = headers.get("connection") == "close"
    if status == 200 and headers.get("content-type") == "text/event-stream" and method == "GET":
        frame_end = buf.find(b"\n\n", rest)
        if frame_end < 0:
            return None, 0
        return Answer(status, headers, b"", buf[rest : frame_end + 2]), len(buf)
    length_text = headers.get("content-length")
    if length_text is None:
        if method == "HEAD" or status in (204, 304):
            return Answer(status, headers, b""), rest
        raise Failure(f"response without Content-Length: {buf[:end]!r}")
    length = int(length_text)
    if method == "HEAD" or status in (204, 304):
        if not close:
            return Answer(status, headers, b""), rest
        # An error that closes the connection (a HEAD refused by the parser)
        # may carry its body: all that remains, once the server has closed.
        return Answer(status, headers, buf[rest:]), -1
    if len(buf) < rest + length:
        return None, 0
    return Answer(status, headers, buf[rest : rest + length]), rest + length


def exchange(port: int, writes: list[bytes], sent: Sent) -> Outcome:
    """Write ``writes`` on a new connection, half-close, read the answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answers: list[Answer] = []
    interim: list[int] = []
    closed = False
    buf = b""
    try:
        try:
            for i, chunk in enumerate(writes):
                if i:
                    time.sleep(0.0005)  # let the server read it as a separate chunk
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the server closed first,
            pass  # refused before the end of what we sent: the answer is still readable
        deadline = time.monotonic() + CASE_TIMEOUT_S
        expected = len(sent.methods)
        while True:
            while buf:
                finals = len(answers) - len(interim)
                method = sent.methods[finals] if finals < expected else None
                answer, used = parse_answer(buf, method)
                if answer is None:
                    break
                if used < 0:  # the rest of the connection is this answer's
                    if not closed:
                        break
                    used = len(buf)
                    if answer.body and len(answer.body) != int(answer.headers["content-length"]):
                        raise Failure(f"body length mismatch: {answer!r}")
                if answer.status < 200:
                    interim.append(len(answers))
                answers.append(answer)
                buf = buf[used:]
            last = answers[-1] if answers and answers[-1].status >= 200 else None
            if last is not None and last.first_frame:
                break  # an event stream: it stays open, we are done
            if last is not None and last.headers.get("connection") == "close":
                if closed:
                    if buf:
                        raise Failure(f"bytes after a Connection: close answer: {buf[:200]!r}")
                    break
            elif closed:
                if buf:
                    raise Failure(f"connection closed inside a response: {buf[:300]!r}")
                break
            elif len(answers) - len(interim) >= expected and not buf and not sent.error:
                break  # every complete request has its answer
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure(f"no answer and no close in {CASE_TIMEOUT_S}s; got {buf[:300]!r}")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            except TimeoutError:
                continue
            if chunk:
                buf += chunk
            else:
                closed = True
    finally:
        sock.close()
    return Outcome(answers, interim, closed)


def strict_topic(raw: str) -> str | None:
    """A query value's strict UTF-8 decoding, or None where it is invalid."""
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        return None


def judge(srv: Server, sent: Sent, outcome: Outcome, clean: bool) -> None:
    """The checks every case must pass; ``clean``: well-formed requests, whose
    answers are also checked against the routes."""
    finals = [a for a in outcome.answers if a.status >= 200]
    if len(finals) > len(sent.methods) + 1:
        raise Failure(f"{len(finals)} answers to {len(sent.methods)} requests")
    for i, answer in enumerate(finals):
        if SECRET in answer.body:
            raise Failure("a file outside the static dir was served")
        if answer.status >= 500 and answer.status != 503:
            if i < len(sent.urls) and is_nul_static(sent.methods[i], sent.urls[i]):
                srv.known.nul_static_path += 1
                continue
            raise Failure(f"answered {answer.status}: {answer!r}")
        if answer.first_frame and not answer.first_frame.startswith(b"event: message\ndata: {"):
            raise Failure(f"stream's first frame: {answer.first_frame!r}")
    # 1xx: only as the first answer to a request that sent Expect: 100-continue.
    for position in outcome.interim:
        index = sum(1 for a in outcome.answers[:position] if a.status >= 200)
        wanted = [
            i
            for i, h in enumerate(sent.headers)
            if h.get(b"expect", b"").lower() == b"100-continue"
        ]
        if index not in wanted:
            if any(w > index for w in wanted):
                srv.known.early_continue += 1
            elif wanted or not sent.error:
                raise Failure(f"100 Continue for request {index}; Expect on {wanted}")
    if clean:
        judge_routes(srv, sent, finals)


def is_nul_static(method: str, url: bytes) -> bool:
    path = url.split(b"?")[0]
    return method in ("GET", "HEAD") and b"\x00" in unquote_to_bytes(path)


def judge_routes(srv: Server, sent: Sent, finals: list[Answer]) -> None:
    """Well-formed requests get their route's answers, to each in order."""
    count = len(sent.methods)
    if sent.error:
        raise Failure("a clean case did not parse")
    closes = [i for i, k in enumerate(sent.keep_alive) if not k]
    due = closes[0] + 1 if closes else count  # nothing is read after a Connection: close
    if len(finals) > due:
        raise Failure(f"{len(finals)} answers to {due} requests read")
    ended = finals and (finals[-1].first_frame or finals[-1].headers.get("connection") == "close")
    if len(finals) < due and not ended:
        raise Failure(f"{len(finals)} answers to {due} requests, and no reason to stop")
    for i, answer in enumerate(finals[:count]):
        method, url = sent.methods[i], sent.urls[i].decode("latin-1")
        path, _, query = url.partition("?")
        status = answer.status
        allowed = ROUTES.get(path)
        if status in (431, 413, 503):
            continue  # a limit, wherever it is
        if allowed is None:
            # The static dir: a file, none, or a path that is not UTF-8 (400).
            want = {200, 400, 404} if method in ("GET", "HEAD") else {404}
        elif method == "OPTIONS":
            want = {204}
        elif method not in allowed:
            want = {405}
        elif path in ("/healthz", "/readyz", "/metrics", "/gochan.js"):
            want = {200}
        else:
            want = {200, 202, 400, 401, 403}  # 403: a cross-site Origin
        if status not in want:
            raise Failure(f"{method} {url!r} answered {status}, want {sorted(want)}: {answer!r}")
        if status in (204, 405) and "allow" not in answer.headers:
            raise Failure(f"{status} without Allow: {answer!r}")
        if path == "/events" and method == "GET":
            judge_events(srv, query, answer)
        if (
            path == "/publish"
            and status == 200
            and not re.fullmatch(
                rb'\{"id":(null|"[^"]+")\}|\{"ids":\[((null|"[^"]+")(,(null|"[^"]+"))*)?\]\}',
                answer.body,
            )
        ):  # one message's id, or a batch's ids (an empty batch: none)
            raise Failure(f"publish answered {answer!r}")


def judge_events(srv: Server, query: str, answer: Answer) -> None:
    """A stream subscribes the topics it names (exactly, for a new client);
    topics that are not valid UTF-8 are refused."""
    fields = [part.partition("=") for part in query.split("&") if part]
    topics = [strict_topic(v) for n, _, v in fields if strict_topic(n) == "topic"]
    ids = [strict_topic(v) for n, _, v in fields if strict_topic(n) == "id"]
    if answer.status != 200 or not answer.first_frame:
        return
    first = orjson.loads(answer.first_frame.split(b"data: ", 1)[1])
    if None in topics:
        srv.known.replaced_utf8_topic += 1  # should be 400: see Known
        return
    held = set(first["subscriptions"])
    new_client = not ids or ids[0] == ""
    if not set(topics) <= held or (new_client and held != set(topics)):
        raise Failure(f"stream subscribed {sorted(held)} for topics {topics}")


def run_case(srv: Server, writes: list[bytes], clean: bool = False) -> None:
    data = b"".join(writes)
    sent = Sent.parse(data)
    try:
        outcome = exchange(srv.port, writes, sent)
        judge(srv, sent, outcome, clean)
    except Failure as exc:
        report = f"{exc}\n  case bytes: {data[:3000]!r}\n  writes: {len(writes)}"
        if not KEEP_GOING:
            raise Failure(report) from None
        kind = re.sub(r"[0-9]+", "N", str(exc).split(":")[0])[:80]
        srv.failures.setdefault(kind, report)
    srv.cases += 1
    if srv.cases % CHECK_EVERY == 0:
        srv.checkpoint()


def run_cases(srv: Server, payload: bytes, data: st.DataObject, clean: bool = False) -> None:
    """``payload`` in one write, then (a second case) cut in a few writes."""
    run_case(srv, [payload], clean)
    writes = data.draw(splits(payload))
    if len(writes) > 1:
        run_case(srv, writes, clean)


# -- what a case is made of ---------------------------------------------------

TCHAR = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Bytes a query may carry unescaped in a request target.
QCHAR = string.ascii_letters + string.digits + "-._~!$'()*,;:@/"

tokens = st.text(alphabet=TCHAR, min_size=1, max_size=12)
topics = st.one_of(
    st.sampled_from(
        ["fz", "a", "b.c", "user.42.x", "message", "", "x" * 256, "x" * 257, "é" * 128,
         "é" * 129, "日本", "a b", "a\x00b", "a\r\nb", "a\nb", "\ufffd", "a&b=c", "%", "+"]
    ),
    st.text(max_size=16),
).filter(lambda t: HEALTHY not in t)  # fmt: skip
bad_escapes = st.sampled_from(
    ["%", "%G0", "%F", "%%", "%C3", "%FF", "%00", "%ED%A0%80", "%C0%80", "%F4%90%80%80", "%0D%0A"]
)


def q_values(ids: list[str]) -> st.SearchStrategy[str]:
    """Query values: escaped topics and ids, raw escapes (invalid UTF-8 too)."""
    return st.one_of(
        topics.map(lambda t: quote(t, safe="")),
        topics.map(lambda t: quote(t, safe="").replace("%20", "+")),
        st.binary(max_size=8).map(lambda b: "".join(f"%{x:02X}" for x in b)),
        bad_escapes,
        st.text(alphabet=QCHAR, max_size=10),
        st.sampled_from([*ids, "nope", "x" * 128, "x" * 129, "%2F..%2F"]),
    )


def queries(ids: list[str]) -> st.SearchStrategy[str]:
    names = st.one_of(
        st.sampled_from(["topic", "topic", "id", "last_event_id", "%74opic", "access_token", ""]),
        st.text(alphabet=QCHAR, max_size=6),
    )
    pair = st.tuples(names, q_values(ids)).map(lambda p: f"{p[0]}={p[1]}")
    bare = st.text(alphabet=QCHAR + "=&", max_size=6)
    return st.lists(st.one_of(pair, pair, bare), max_size=5).map("&".join)


PATHS = [*ROUTES, "/", "/nope", "/events/", "//events", "/%65vents", "/index.html",
         "/sub/a.txt", "/sub/", "/../secret.txt", "/sub/../../secret.txt", "/%2e%2e/secret.txt",
         "/%2E%2E%2Fsecret.txt", "/..%2fsecret.txt", "/sub/%2e%2e/%2e%2e/secret.txt",
         "/%00", "/a%00b", "/%FF", "/%C3", "/%"]  # fmt: skip
paths = st.one_of(
    st.sampled_from(PATHS),
    st.binary(max_size=10).map(lambda b: "/" + "".join(f"%{x:02X}" for x in b)),
    st.text(alphabet=QCHAR, max_size=12).map(lambda t: "/" + t),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return b"{}"  # e.g. an integer past 64 bits


def update_bodies(ids: list[str]) -> st.SearchStrategy[bytes]:
    topic_lists = st.one_of(st.lists(topics, max_size=4), json_values)
    body = st.fixed_dictionaries(
        {},
        optional={
            "client_id": st.one_of(st.sampled_from([*ids, "", "nope"]), json_values),
            "add": topic_lists,
            "remove": topic_lists,
        },
    )
    return st.one_of(
        body.map(dumps), body.map(dumps), json_values.map(dumps), st.binary(max_size=40)
    )


def form(pairs: dict[str, str]) -> bytes:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs.items()).encode()


@dataclass
class Request:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


@st.composite
def requests(draw: st.DrawFn, ids: list[str]) -> Request:
    """One well-formed request to some endpoint, with a body fitting it."""
    kind = draw(st.sampled_from(["events", "events", "update", "publish", "publish", "other"]))
    headers: list[tuple[bytes, bytes]] = []
    body = b""
    if kind == "events":
        method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
        target = "/events?" + draw(queries(ids))
        if draw(st.booleans()):
            headers.append((b"Last-Event-ID", draw(st.text(alphabet=QCHAR, max_size=20)).encode()))
    elif kind == "update":
        method = "POST"
        target = "/update_subscriptions"
        body = draw(update_bodies(ids))
        headers.append((b"Content-Type", b"application/json"))
    elif kind == "publish":
        method = "POST"
        style = draw(st.sampled_from(["query", "form", "json", "text"]))
        target = "/publish"
        data = draw(st.binary(max_size=40))
        if style == "query":
            target += "?" + draw(queries(ids))
            body = data
        elif style == "form":
            pairs = draw(st.dictionaries(st.sampled_from(["topic", "data", "x"]), topics))
            body = form(pairs)
            headers.append((b"Content-Type", b"application/x-www-form-urlencoded"))
        elif style == "json":
            doc = draw(st.fixed_dictionaries({}, optional={"topic": topics, "data": json_values}))
            body = dumps(doc) if draw(st.booleans()) else draw(json_values.map(dumps))
            ctype = draw(
                st.sampled_from([b"application/json", b"APPLICATION/JSON; charset=x", b""])
            )
            if ctype:
                headers.append((b"Content-Type", ctype))
        else:
            body = data
            headers.append((b"Content-Type", b"text/plain"))
    else:
        method = draw(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE", "PATCH"]))
        target = draw(paths)
        if draw(st.booleans()):
            target += "?" + draw(queries(ids))
        body = draw(st.binary(max_size=20)) if method in ("POST", "PUT", "PATCH") else b""
    extra = st.sampled_from(
        [(b"Origin", b"http://example.com"), (b"Authorization", b"Bearer nope"),
         (b"Expect", b"100-continue"), (b"Connection", b"close"), (b"Connection", b"keep-alive"),
         (b"Cookie", b"gochan_token=x"), (b"Accept", b"text/event-stream"),
         (b"Content-Type", b"text/plain")]
    )  # fmt: skip
    random_header = st.tuples(
        tokens.map(str.encode), st.text(alphabet=QCHAR + " \t", max_size=20).map(str.encode)
    ).filter(lambda h: h[0].lower() not in (b"content-length", b"transfer-encoding", b"upgrade"))
    headers += draw(st.lists(st.one_of(extra, random_header), max_size=4))
    return Request(method, target, headers, body)


@st.composite
def framed(draw: st.DrawFn, request: Request, clean: bool) -> bytes:
    """The request's bytes, its body framed by Content-Length or chunks (or,
    not ``clean``, by contradictory or broken framing)."""
    version = b"HTTP/1.1"
    if not clean:
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0"]))
    lines = [f"{request.method} {request.target} ".encode() + version, b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in request.headers]
    body = request.body
    styles = ["length", "chunked"] if clean else ["length", "chunked", "none", "both", "odd"]
    style = draw(st.sampled_from(styles)) if body or draw(st.booleans()) else "none"
    if style == "length":
        lines.append(b"Content-Length: %d" % len(body))
    elif style in ("chunked", "both"):
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body))), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        ext = draw(st.sampled_from([b"", b";a=b", b"; x"])) if not clean else b""
        chunks = b"".join(b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces if p)
        trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
        body = chunks + b"0\r\n" + trailer + b"\r\n"
        lines.append(b"Transfer-Encoding: chunked")
        if style == "both":
            lines.append(b"Content-Length: %d" % draw(st.integers(0, len(body) + 2)))
    elif style == "odd":
        lines += draw(
            st.lists(
                st.sampled_from(
                    [b"Content-Length: %d" % (len(body) + 1), b"Content-Length: %d" % len(body),
                     b"Content-Length: -1", b"Content-Length: +3", b"Content-Length:  3 ",
                     b"Content-Length: 0x10", b"Content-Length: 99999999999999999999999",
                     b"Content-Length: 3, 3", b"Transfer-Encoding: gzip, chunked",
                     b"Transfer-Encoding: chunked, gzip", b"Transfer-Encoding: Chunked",
                     b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked",
                     b"Transfer-Encoding:\tchunked", b"Transfer-Encoding : chunked",
                     b"Upgrade: websocket\r\nConnection: Upgrade"]
                ),
                min_size=1,
                max_size=3,
            )
        )  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` in one write, or cut at a few points."""
    if len(data) < 2:
        return [data]
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), min_size=1, max_size=3)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


TOKENS = [b"\x00", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" ", b"\t", b":", b"%", b"%00", b"\xff",
          b"\x80", b"?", b"#", b"&", b"=", b"+", b"/../", b"Transfer-Encoding: chunked\r\n",
          b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Expect: 100-continue\r\n",
          b"Connection: close\r\n", b" HTTP/1.1\r\n", b"0\r\n\r\n",
          b"GET /healthz HTTP/1.1\r\n\r\n", b"event: healthy\ndata: injected\n\n",
          b"\r\nevent: healthy\r\ndata: x\r\n\r\n"]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(out)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "token", "dup", "truncate"]))
        if op == "flip" and pos < len(out):
            out[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 8))]
        elif op == "token":
            out[pos:pos] = draw(st.sampled_from(TOKENS))
        elif op == "dup":
            out[pos:pos] = out[pos : pos + draw(st.integers(1, 40))]
        elif op == "truncate":
            del out[pos:]
    return bytes(out)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Requests assembled from odd pieces of the grammar."""
    method = draw(
        st.one_of(
            st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"CONNECT", b"PRI",
                             b"TRACE", b"get", b"G\x00T", b"", b"GET GET", b"\xffGET"]),
            st.binary(max_size=8),
        )
    )  # fmt: skip
    sep = st.sampled_from([b" ", b" ", b"  ", b"\t", b"", b"\x00"])
    target = draw(
        st.one_of(
            st.sampled_from([b"/healthz", b"/events?topic=fz", b"*", b"http://x/healthz",
                             b"/events?topic=%FF", b"/%00", b"/a b", b"", b"/healthz#x",
                             b"//", b"/events?topic=a\x00b", b"/\xff\xfe", b"healthz"]),
            st.binary(max_size=30),
            st.sampled_from(PATHS).map(str.encode),
        )
    )  # fmt: skip
    version = draw(
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1", b"",
                         b"HTTP/1.10", b"http/1.1", b"HTTP/1.1 ", b"HTTP/1.1\x00", b"HTTP/11"])
    )  # fmt: skip
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"\n\r"]))
    header = st.tuples(
        st.one_of(
            st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection",
                             b"Expect", b"Upgrade", b"X", b"", b"Bad Name", b"X\x00", b"\xff"]),
            st.binary(max_size=10),
        ),
        st.sampled_from([b": ", b":", b" : ", b"", b":\t"]),
        st.one_of(
            st.sampled_from([b"chunked", b"5", b"0", b"-1", b"close", b"100-continue",
                             b"websocket", b"a\x00b", b"\xff\xfe", b"x" * 300]),
            st.binary(max_size=20),
        ),
    )  # fmt: skip
    lines = [method + draw(sep) + target + draw(sep) + version]
    lines += [n + s + v for n, s, v in draw(st.lists(header, max_size=5))]
    body = draw(
        st.one_of(
            st.binary(max_size=30),
            st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"0\r\n\r\n",
                             b"ffffffffffffffff\r\n", b"5;ext\r\nhello\r\n0\r\n\r\n",
                             b"5\r\nhelloXX0\r\n\r\n", b"\r\n"]),
        )
    )  # fmt: skip
    return eol.join(lines) + eol + eol + body


def pipelined(ids: list[str], clean: bool) -> st.SearchStrategy[bytes]:
    one = requests(ids).flatmap(lambda r: framed(r, clean))
    return st.lists(one, min_size=1, max_size=4).map(b"".join)


# -- the tests ----------------------------------------------------------------


def share(part: float) -> int:
    return max(10, int(EXAMPLES * part))


@seeded
@profile(share(0.35))
@given(data=st.data())
def test_fuzz_endpoints(server: Server, data: st.DataObject) -> None:
    """Well-formed, maybe pipelined, maybe split requests to every endpoint:
    the answers are also checked against the routes."""
    payload = data.draw(pipelined(server.client_ids, clean=True))
    run_cases(server, payload, data, clean=True)


@seeded
@profile(share(0.3))
@given(data=st.data())
def test_fuzz_mutated_requests(server: Server, data: st.DataObject) -> None:
    """The same requests with broken framing, versions, flipped or inserted bytes."""
    payload = data.draw(pipelined(server.client_ids, clean=False))
    if data.draw(st.booleans()):
        payload = data.draw(mutated(payload))
    run_cases(server, payload, data)


@seeded
@profile(share(0.3))
@given(data=st.data())
def test_fuzz_raw_bytes(server: Server, data: st.DataObject) -> None:
    """Odd request lines and headers, raw bytes, several in one write."""
    parts = data.draw(
        st.lists(st.one_of(raw_requests(), st.binary(max_size=64)), min_size=1, max_size=3)
    )
    run_cases(server, b"".join(parts), data)


@st.composite
def near_limits(draw: st.DrawFn, ids: list[str]) -> tuple[bytes, str, bool]:
    """A request within a few bytes of one of the server's limits: (bytes,
    which limit, over it)."""
    delta = draw(st.integers(-3, 3))
    limit = draw(
        st.sampled_from(["url", "header_bytes", "headers", "body", "chunked", "topic", "id"])
    )
    head = b"Host: 127.0.0.1\r\n"
    if limit == "url":
        target = b"/events?topic=" + b"u" * (MAX_URL + delta - len(b"/events?topic="))
        return b"HEAD " + target + b" HTTP/1.1\r\n" + head + b"\r\n", limit, delta > 0
    if limit == "header_bytes":
        # The server counts name + value + 4 per header.
        used = len(b"Host") + len(b"127.0.0.1") + 4
        size = MAX_HEADER_BYTES + delta - used - len(b"X-Big") - 4
        return (
            b"GET /healthz HTTP/1.1\r\n" + head + b"X-Big: " + b"b" * size + b"\r\n\r\n",
            limit,
            delta > 0,
        )
    if limit == "headers":
        count = MAX_HEADERS + delta - 1
        extra = b"".join(b"X-%d: 1\r\n" % i for i in range(max(0, count)))
        return b"GET /healthz HTTP/1.1\r\n" + head + extra + b"\r\n", limit, delta > 0
    if limit in ("body", "chunked"):
        body = b"q" * (MAX_BODY + delta)
        if limit == "body":
            framing = b"Content-Length: %d\r\n" % len(body)
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        return (
            b"POST /publish?topic=fz HTTP/1.1\r\n" + head + framing + b"\r\n" + body,
            limit,
            delta > 0,
        )
    if limit == "topic":  # 256 bytes of UTF-8, in characters of 1 to 4 bytes
        char = draw(st.sampled_from(["a", "é", "日", "😀"]))
        n = (256 + delta) // len(char.encode())
        topic = char * n
        over = len(topic.encode()) > 256
        return (
            b"GET /events?topic=" + quote(topic).encode() + b" HTTP/1.1\r\n" + head + b"\r\n",
            limit,
            over,
        )
    client_id = "i" * (128 + delta)
    return (
        b"GET /events?id=" + client_id.encode() + b" HTTP/1.1\r\n" + head + b"\r\n",
        limit,
        delta > 0,
    )


@seeded
@profile(share(0.03))
@given(data=st.data())
def test_fuzz_near_limits(server: Server, data: st.DataObject) -> None:
    """Values a few bytes either side of every limit: refused past it only."""
    payload, limit, over = data.draw(near_limits(server.client_ids))
    writes = data.draw(splits(payload))
    sent = Sent.parse(payload)
    try:
        outcome = exchange(server.port, writes, sent)
        judge(server, sent, outcome, clean=True)
        status = outcome.answers[-1].status if outcome.answers else 0
        refused = {"url": 431, "header_bytes": 431, "headers": 431, "body": 413, "chunked": 413}
        if limit in refused:
            assert (status == refused[limit]) == over, (limit, over, status)
        else:
            assert (status == 400) == over or (limit == "id" and status == 401 and not over), (
                limit,
                over,
                status,
            )
    except (Failure, AssertionError) as exc:
        raise Failure(f"{exc}\n  case: {payload[:300]!r}... ({len(payload)} bytes)") from None
    server.cases += 1
    server.checkpoint()


def test_server_survived(server: Server) -> None:
    """After all the fuzzing: alive, healthy stream complete and clean, no traceback."""
    server.verified = True
    server.verify()
    assert server.cases >= 4 * 10
