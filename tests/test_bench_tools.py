"""The benchmark's own tools work: the C load generator counts every delivery
(its self-test), bench/compare.py drives real gochan processes over HTTP
and through a real NATS server end to end, the C reference server
(bench/c_reference/server.c) answers and frames like gochan, and bench/chart.py
draws a result's chart. Nothing here is timed: the runs are tiny and only their
counts and bytes are checked."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def need(binary: str) -> None:
    if shutil.which(binary) is None:
        if os.environ.get("GOCHAN_REQUIRE_BROKERS") == "1":
            pytest.fail(f"{binary} is required here (GOCHAN_REQUIRE_BROKERS=1)")
        pytest.skip(f"{binary} is not installed")


def test_load_generator_counts_every_delivery_exactly_once() -> None:
    need("cc")
    run = subprocess.run(
        [sys.executable, str(BENCH / "loadgen" / "selftest.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_compare_runs_gochan_over_http_and_nats(tmp_path: Path) -> None:
    need("cc")
    need("taskset")
    need("nats-server")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--servers",
            "gochan,gochan-nats",
            "--connections",
            "200",
            "--rates",
            "50,200",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--drain",
            "3",
            "--refine",
            "0",
            "--quiet-wait",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    for name in ("gochan", "gochan-nats"):
        server = report["servers"][name]
        assert server["ok"] and server["error"] is None, server["error"]
        assert server["connect"]["ready"] == 200
        steps = server["steps"]
        assert [s["rate"] for s in steps] == [50, 200]
        for step in steps:
            # 200 connections x 10 of 1,000 topics: 2 subscribers per topic.
            assert step["expected"] == 2 * step["published"] > 0
            assert step["received"] == step["expected"], step
            assert step["disconnects"] == 0 and step["pub_errors"] == 0
    assert report["servers"]["gochan"]["steps"][0]["pub_non2xx"] == 0
    assert "broker_cpu_share" in report["servers"]["gochan-nats"]["steps"][0]
    assert "gochan-nats" in run.stdout and "max sustained deliveries/s" in run.stdout
    if importlib.util.find_spec("matplotlib") is not None:  # the chart, next to its JSON
        assert (tmp_path / "result.png").read_bytes()[:8] == PNG_SIGNATURE


def load_compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    assert spec is not None and spec.loader is not None
    compare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = compare  # its dataclasses look their module up
    try:
        spec.loader.exec_module(compare)
    finally:
        del sys.modules[spec.name]
    return compare


# ---------------------------------------------------------------- the C reference server

IO_TIMEOUT_S = 10.0  # a bound on every wait below, not a measure


@contextlib.contextmanager
def serving(cmd: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    compare = load_compare()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        compare.wait_listening(port, proc, 30.0)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.fixture(scope="module")
def c_epoll(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C reference server, built the way compare.py builds it."""
    need(os.environ.get("CC", "cc"))
    compare = load_compare()
    binary = tmp_path_factory.mktemp("c-epoll") / "c-epoll"
    built: Path = compare.build_c(compare.C_REFERENCE_SRC, binary, "c11", "C reference server")
    return built


def read_until(sock: socket.socket, buf: bytes, done: Callable[[bytes], bool]) -> bytes:
    """Read from sock until done(buf) holds (each recv bounded by IO_TIMEOUT_S)."""
    sock.settimeout(IO_TIMEOUT_S)
    while not done(buf):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early; got {buf!r}"
        buf += chunk
    return buf


def http_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split pipelined responses (Content-Length bodies) into (head, body) pairs;
    a trailing incomplete one is left out."""
    out = []
    while b"\r\n\r\n" in data:
        head, rest = data.split(b"\r\n\r\n", 1)
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert length is not None, head
        size = int(length.group(1))
        if len(rest) < size:
            break
        out.append((head, rest[:size]))
        data = rest[size:]
    return out


def normal_head(head: bytes) -> list[bytes]:
    """A response head without what differs by server and time (Server, Date)."""
    return [
        line for line in head.split(b"\r\n") if not line.lower().startswith((b"server:", b"date:"))
    ]


# Bodies with every kind of line break, trailing ones and none at all.
PUBLISHES = [
    ("news", b"line one\r\nline two\nline three\rline four"),
    ("sport", b'{"payload":"sport 1"}'),
    ("news", b"cr at the end\r\r\n\n"),
    ("sport", b""),
]


def exchange(port: int) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Against a server on port: a stream on two topics, then the publishes in
    pipelined pairs (one request to each topic, both in one write) and one to a
    topic nobody holds. Returns the stream's head with its first frame, the
    publish answers, and the message frames the stream got."""
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as stream:
        stream.sendall(b"GET /events?topic=news&topic=sport HTTP/1.1\r\n" + host + b"\r\n")
        first = read_until(
            stream, b"", lambda b: b"\r\n\r\n" in b and b"\n\n" in b.split(b"\r\n\r\n", 1)[1]
        )
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as pub:
            requests = [
                b"POST /publish?topic=%s HTTP/1.1\r\n%sContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (topic.encode(), host, len(body), body)
                for topic, body in [*PUBLISHES, ("nobody", b"x")]
            ]
            answers = b""
            for pair in (requests[0:2], requests[2:4], requests[4:]):
                pub.sendall(b"".join(pair))
                want = len(http_responses(answers)) + len(pair)
                answers = read_until(pub, answers, lambda b, n=want: len(http_responses(b)) >= n)
        head, frames = first.split(b"\r\n\r\n", 1)
        frames = read_until(stream, frames, lambda b: b.count(b"\n\n") >= 1 + len(PUBLISHES))
    return head + b"\r\n\r\n", http_responses(answers), frames


EXPECTED_FRAMES = (
    b'event: message\ndata: {"config":{"client_id":"<client>","client_ttl_millis":60000},'
    b'"subscriptions":["news","sport"]}\n\n'
    b"event: news\nid: <id>\ndata: line one\ndata: line two\ndata: line three\n"
    b"data: line four\n\n"
    b'event: sport\nid: <id>\ndata: {"payload":"sport 1"}\n\n'
    b"event: news\nid: <id>\ndata: cr at the end\ndata: \ndata: \ndata: \n\n"
    b"event: sport\nid: <id>\ndata: \n\n"
)
EVENT_ID = rb"[0-9a-f]{8}-[0-9]+"


def normal_frames(frames: bytes) -> bytes:
    frames = re.sub(rb'"client_id":"[A-Za-z0-9_-]{24}"', b'"client_id":"<client>"', frames)
    return re.sub(rb"(?m)^id: " + EVENT_ID + rb"$", b"id: <id>", frames)


def test_c_reference_answers_and_frames_like_gochan(c_epoll: Path) -> None:
    compare = load_compare()
    seen = {}
    for name, cmd in (
        ("c-epoll", [str(c_epoll)]),
        ("gochan", [sys.executable, "-m", "gochan.server", "--log-level", "warning"]),
    ):
        port = compare.free_port()
        with serving([*cmd, "--host", "127.0.0.1", "--port", str(port)], port):
            seen[name] = exchange(port)
    head, answers, frames = seen["c-epoll"]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert normal_head(head) == normal_head(seen["gochan"][0])
    # Every publish answered in order: 200 and its id, null for the topic nobody holds.
    assert [normal_head(h) for h, _ in answers] == [normal_head(h) for h, _ in seen["gochan"][1]]
    ids = [json.loads(body)["id"] for _, body in answers]
    assert ids[-1] is None and all(re.fullmatch(EVENT_ID.decode(), i) for i in ids[:-1])
    epochs, seqs = zip(*(i.split("-") for i in ids[:-1]), strict=True)
    assert len(set(epochs)) == 1 and [int(n) for n in seqs] == [1, 2, 3, 4]
    # The frames, ids in the order of the answers; gochan sends the same bytes.
    assert re.findall(rb"(?m)^id: (.*)$", frames) == [i.encode() for i in ids[:-1]]
    assert normal_frames(frames) == EXPECTED_FRAMES
    assert normal_frames(seen["gochan"][2]) == EXPECTED_FRAMES


def test_c_reference_drops_a_stream_that_does_not_read(c_epoll: Path) -> None:
    """Past --max-pending unsent bytes the stream is closed; the server keeps serving."""
    compare = load_compare()
    port = compare.free_port()
    cmd = [str(c_epoll), "--port", str(port), "--max-pending", "65536", "--sndbuf", "4096"]
    body = b"x" * 1000
    publishes = 2000  # 2 MB for a stream that reads nothing
    with serving(cmd, port), socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(IO_TIMEOUT_S)
        stuck.connect(("127.0.0.1", port))
        stuck.sendall(b"GET /events?topic=t HTTP/1.1\r\n\r\n")
        read_until(stuck, b"", lambda b: b"subscriptions" in b)
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as pub:
            request = b"POST /publish?topic=t HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + body
            answers = b""
            for _ in range(publishes // 10):  # 10 KB at a time, well under the bound
                pub.sendall(request * 10)
                want = len(http_responses(answers)) + 10
                answers = read_until(pub, answers, lambda b, n=want: len(http_responses(b)) >= n)
            pub.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            answers = read_until(pub, answers, lambda b: len(http_responses(b)) > publishes)
        assert http_responses(answers)[-1][1] == b"ok\n"
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := stuck.recv(65536):
                received += chunk
    frames = received.count(b"\nid: ")
    assert 0 < frames < publishes // 2, frames  # cut off, not 2 MB kept for it


def test_compare_runs_the_c_reference(tmp_path: Path) -> None:
    need("cc")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--servers",
            "c-epoll",
            "--connections",
            "200",
            "--rates",
            "50,200",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--refine",
            "0",
            "--quiet-wait",
            "0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    server = json.loads(out.read_text())["servers"]["c-epoll"]
    assert server["ok"] and server["connect"]["ready"] == 200
    for step in server["steps"]:
        assert step["received"] == step["expected"] == 2 * step["published"] > 0, step
        assert step["disconnects"] == 0 and step["pub_non2xx"] == 0


def synthetic_report() -> dict[str, Any]:
    """A small compare.py report of the real schema (compare.ServerResult's summaries),
    made-up figures: 1,000 connections x 10 of 100 topics, 100 subscribers per topic."""
    compare = load_compare()

    def step(rate: float, deliveries: float, p99_ms: float, sustained: bool) -> dict[str, Any]:
        return {
            "rate": rate,
            "target": rate * 2,
            "published": rate * 2,
            "publish_rate": rate,
            "expected": deliveries * 2,
            "received": deliveries * 2,
            "deliveries_per_s": deliveries,
            "delivery_ratio": 1.0 if sustained else 0.5,
            "latency_us": {
                "p50": p99_ms * 400,
                "p90": p99_ms * 800,
                "p99": p99_ms * 1000,
                "max": p99_ms * 1200,
            },
            "cpu_share": 0.3,
            "server_cpu_share": 0.9,
            "other_cpu_cores": 0.0,
            "disconnects": 0,
            "sustained": sustained,
        }

    shapes = {
        "gochan": [(100, 10_000, 1.3, True), (1000, 100_000, 1.5, True), (3e3, 29e4, 40, False)],
        "sse-starlette": [(100, 10_000, 27, True), (1000, 25_000, 7000, False)],
        "aiohttp-sse": [(100, 10_000, 3.3, True), (1000, 26_000, 7000, False)],
    }
    servers: dict[str, Any] = {}
    for name, steps in shapes.items():
        result = compare.ServerResult(
            name=name,
            ok=True,
            connect={"ready": 1000, "connect_time_s": 0.5},
            rss_before_kib=20_000,
            rss_after_kib=20_000 + {"gochan": 2800, "sse-starlette": 48_800}.get(name, 18_800),
            steps=[step(*s) for s in steps],
        )
        servers[name] = {
            "ok": True,
            "error": None,
            "version": "",
            "summary": result.summary(),
            "connect": result.connect,
            "rss_before_kib": result.rss_before_kib,
            "rss_after_kib": result.rss_after_kib,
            "rss_peak_kib": result.rss_after_kib,
            "steps": result.steps,
        }
    servers["gochan-nats"] = {"ok": False, "error": "nats-server is not installed", "steps": []}
    return {
        "started_at": "2026-12-02T01:30:00+00:00",
        "command": "python bench/compare.py --quick",
        "commit": "abc1234",
        "workload": {
            "name": "1000topics",
            "connections": 1000,
            "topics": 100,
            "per_conn_topics": 10,
            "subscribers_per_topic": 100.0,
            "duration_s": 2.0,
        },
        "machine": {"cpus": 2, "python": "3.11.7", "cpu_model": "Test CPU"},
        "servers": servers,
    }


def test_chart_draws_a_png_from_a_result(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="pip install -e '.[bench]' (or '.[test]')")
    from matplotlib.image import imread

    result = tmp_path / "compare-x.json"
    result.write_text(json.dumps(synthetic_report()))
    run = subprocess.run(
        [sys.executable, str(BENCH / "chart.py"), str(result)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    png = tmp_path / "compare-x.png"  # next to its JSON
    assert run.stdout.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 20_000  # three panels of lines, bars and text, not an empty canvas
    pixels = imread(png)[:, :, :3]
    assert pixels.shape[0] > 400 and pixels.shape[1] > 1000
    # gochan's lines and bar are drawn in its own colour (#1f5fbf).
    gochan = (abs(pixels - [0x1F / 255, 0x5F / 255, 0xBF / 255]).max(axis=2) < 0.02).sum()
    assert gochan > 500


def test_chart_refuses_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"benchmarks": []}))
    run = subprocess.run(
        [sys.executable, str(BENCH / "chart.py"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "not a bench/compare.py result" in run.stderr
    assert not (tmp_path / "other.png").exists()


# ---------------------------------------------------------------- bench/cluster.py


def test_cluster_runs_nodes_with_and_without_cluster(tmp_path: Path) -> None:
    """bench/cluster.py end to end at tiny sizes: two nodes on a NATS server of
    its own (JetStream), the load spread over both, then the connect and
    update storms with --cluster off and on. Counts only, no timings."""
    need("cc")
    need("nats-server")
    out = tmp_path / "cluster.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCH / "cluster.py"),
            "--nodes",
            "2",
            "--connections",
            "100",
            "--rates",
            "50",
            "--warmup",
            "0.3",
            "--duration",
            "1",
            "--drain",
            "5",
            "--refine",
            "0",
            "--quiet-wait",
            "0",
            "--storm-connections",
            "40",
            "--storm-topics",
            "10",
            "--updates",
            "40",
            "--update-streams",
            "8",
            "--update-concurrency",
            "4",
            "--hold-s",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["errors"] == []
    [two] = report["throughput"]
    assert two["nodes"] == 2 and two["ok"] and two["connect"]["ready"] == 100
    [step] = two["steps"]
    # 100 connections x 10 of 1,000 topics, half on each node; publishes to
    # either node reach the subscribers of both.
    assert step["received"] == step["expected"] == step["published"] > 0, step
    assert step["disconnects"] == 0 and step["pub_non2xx"] == 0
    assert "broker_cpu_share" in step
    off, on = report["cost"]["off"], report["cost"]["on"]
    for cost in (off, on):
        assert cost["connect"]["ops"] == 40 and cost["connect"]["failed"] == 0
        assert cost["disconnect"]["ops"] == 40
        assert cost["update"]["ops"] == 40 and cost["update"]["failures"] == 0
    # Only cluster nodes talk to the store; half the updates went to the other node.
    assert off["connect"]["store_msgs_per_op"] == 0 == off["update"]["store_msgs_per_op"]
    assert on["connect"]["store_msgs_per_op"] > 0.5
    assert on["update"]["latency_ms_to_other_node"]["count"] == 20
    assert off["update"]["latency_ms_to_other_node"]["count"] == 0
    # Held idle: the storm's 40 clients, 10 holding streams per node, the 8 updated.
    assert on["hold"]["held_clients"] == off["hold"]["held_clients"] == 40 + 2 * 10 + 8
    assert on["hold"]["healthz_ms"]["count"] > 0
    assert "cluster on" in run.stdout and "max sustained deliveries/s" in run.stdout


def test_compare_names_the_three_workloads_of_issue_15() -> None:
    compare = load_compare()
    shapes = {}
    for name in ("1000topics", "20subs", "notifications"):
        args = compare.parse_args(["--workload", name])
        shapes[name] = (args.connections, args.topics, args.per_conn_topics)
    assert shapes == {
        "1000topics": (10_000, 1_000, 10),
        "20subs": (2_000, 1_000, 10),
        "notifications": (10_000, 10_000, 1),
    }
    assert compare.parse_args([]).workload == "1000topics"
    # Numbers given override the workload's; --quick caps the connections.
    args = compare.parse_args(["--workload", "notifications", "--topics", "500", "--quick"])
    assert (args.connections, args.topics, args.per_conn_topics) == (1_000, 500, 1)


@pytest.mark.parametrize("only", [[], ["--streamer-only"]], ids=["whole", "streamer-only"])
def test_connect_inproc_opens_every_stream(only: list[str]) -> None:
    """bench/connect_inproc.py at a tiny size: every connect answered with a
    stream (it raises if one is refused or left unanswered), through the
    whole server or through the streamer alone."""
    run = subprocess.run(
        [sys.executable, str(BENCH / "connect_inproc.py"), "--connections", "300", "--rounds", "1",
         "--topics", "50", "--per-conn-topics", "3", *only],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    label = " \\(streamer only\\)" if only else ""
    assert re.match(rf"300 connects x 3 of 50 topics{label}: [\d.]+ us per connect", run.stdout), (
        run.stdout
    )


def test_connect_inproc_on_nats_opens_every_stream() -> None:
    """bench/connect_inproc.py --nats at a tiny size, a topic per connect:
    every connect waits for its SUB and still gets its stream (it raises if
    one is left unanswered), with the CPU figure beside the wall time."""
    from tests.drivers._nats_server import NatsServer

    for server in NatsServer.running():
        run = subprocess.run(
            [sys.executable, str(BENCH / "connect_inproc.py"), "--connections", "300",
             "--rounds", "1", "--topics", "1000", "--per-conn-topics", "1", "--nats", server.url],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        figure = r"300 connects x 1 of 1000 topics on NATS: [\d.]+ us per connect .*CPU [\d.]+ us"
        assert re.match(figure, run.stdout), run.stdout


@pytest.mark.parametrize("jetstream", [[], ["--jetstream"]], ids=["core", "jetstream"])
def test_nats_subscribe_subscribes_every_topic(jetstream: list[str]) -> None:
    """bench/nats_subscribe.py at a tiny size against a nats-server started
    here: both modes print a figure (it exits non-zero if the driver does not
    hold every topic a round subscribed)."""
    from tests.drivers._nats_server import NatsServer

    for server in NatsServer.running():
        run = subprocess.run(
            [sys.executable, str(BENCH / "nats_subscribe.py"), "--url", server.url,
             "--topics", "200", "--rounds", "1", *jetstream],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        for mode in ("serial", "together"):
            figure = rf"{mode}: +[\d.]+ us CPU, +[\d.]+ us wall per subscribe"
            assert re.search(figure, run.stdout), run.stdout


@pytest.mark.parametrize("core", [False, True], ids=["uvloop-floor", "core-floor"])
def test_connect_floors_answer_a_stream(core: bool) -> None:
    """bench/peers/uvloop_floor.py, which bench/connect.py runs beside gochan:
    a GET /events gets an SSE head and a first frame with a fresh id; with
    --core the streams are subscribed to their topics in gochan's hub."""
    compare = load_compare()
    port = compare.free_port()
    cmd = [sys.executable, str(BENCH / "peers" / "uvloop_floor.py"), "--port", str(port)]
    with serving(cmd + (["--core"] if core else []), port):
        streams = []
        for query in (b"topic=a&topic=b", b"topic=b&topic=c"):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            streams.append(sock)
            sock.sendall(b"GET /events?%s HTTP/1.1\r\nHost: x\r\n\r\n" % query)
            got = read_until(sock, b"", lambda b: b.endswith(b"\n\n"))
            assert got.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Type: text/event-stream\r\n" in got
            assert re.search(rb'data: \{"client_id":"[A-Za-z0-9_-]{24}"\}\n\n$', got)
        if core:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /stats HTTP/1.1\r\n\r\n")
                answer = read_until(sock, b"", lambda b: b.endswith(b"}"))
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"topics": 3, "streams": 2}
        for sock in streams:
            sock.close()
