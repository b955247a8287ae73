"""Side-by-side SSE fan-out benchmark: gochan against sse-starlette and aiohttp-sse,
and against c-epoll, a minimal C epoll server (bench/c_reference/server.c) that
shows this machine's limit in the same run.

A workload: C connections, each subscribed at connect to K of T topics (every topic
gets about C*K/T subscribers), and a publisher sending round-robin over the topics at
a rate R that steps up until the server no longer sustains it. ``--workload`` names
the three shapes issue 15 measures (``--connections``, ``--topics`` and
``--per-conn-topics`` override its numbers):

- ``1000topics`` (the default): 10,000 connections x 10 of 1,000 topics, 100
  subscribers per topic: the cost per delivery;
- ``20subs``: 2,000 connections x 10 of 1,000 topics, 20 subscribers per topic;
- ``notifications``: 10,000 connections x 1 of 10,000 topics, one subscriber per
  topic: the cost per message.

gochan runs twice: publishing through POST /publish ("gochan") and through NATS
("gochan-nats": the publisher sends NATS PUB frames to a nats-server started for
the run on the load generator's core, and gochan relays them with --driver nats).

Each server runs pinned to one core (``taskset -c 0``); the C load generator
(``bench/loadgen``: subscribers and pipelined publisher in one epoll loop) runs on the
other (``taskset -c 1``). Everything stays on 127.0.0.1; every wait is bounded and
every process started here is killed on exit, Ctrl-C included. The result is a JSON
file (``--out``) and its chart beside it as PNG (bench/chart.py, if matplotlib is installed).

Usage:
    python bench/compare.py            # full run: 10,000 connections, rates up to 100k/s
    python bench/compare.py --quick    # smoke test: 1,000 connections, 3 short steps
    python bench/compare.py --workload notifications --servers gochan,gochan-nats,c-epoll
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN_SRC = BENCH / "loadgen" / "sse_loadgen.c"
LOADGEN_BIN = BENCH / "loadgen" / "build" / "sse_loadgen"
C_REFERENCE_SRC = BENCH / "c_reference" / "server.c"
C_REFERENCE_BIN = BENCH / "out" / "c-epoll"
RESULTS = BENCH / "results"

SERVERS = ("gochan", "gochan-nats", "sse-starlette", "aiohttp-sse", "c-epoll")
# name -> (connections, topics, topics per connection)
WORKLOADS: dict[str, tuple[int, int, int]] = {
    "1000topics": (10_000, 1_000, 10),
    "20subs": (2_000, 1_000, 10),
    "notifications": (10_000, 10_000, 1),
}
QUICK_CONNECTIONS = 1_000
DEFAULT_RATES = (100, 300, 1000, 3000, 5000, 7000, 10000, 15000, 20000, 30000, 50000, 100000)
QUICK_RATES = (100, 1000, 10000)

SUSTAINED_DELIVERY_RATIO = 0.95  # of expected deliveries, and of the target publish rate
SUSTAINED_P99_US = 1_000_000
GOOD_P99_US = 100_000
LIGHT_LOAD_MAX_RATE = 300
LOADGEN_SATURATED_SHARE = 0.9  # above this the load generator may be the bottleneck
NOISY_OTHER_CORES = 0.25  # a failed step is retried once if others used more than this
NOISY_RETRIES = 1

SERVER_START_TIMEOUT_S = 30.0
SETTLE_S = 2.0
STEP_PAUSE_S = 1.0
STOP_TIMEOUT_S = 5.0
SETTLE_MAX_S = 90.0
SETTLED_CPU_SHARE = 0.3
CLK_TCK = os.sysconf("SC_CLK_TCK")


Json = dict[str, Any]


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def build_c(src: Path, binary: Path, std: str, what: str) -> Path:
    """Compile src with ``cc -O2`` if the binary is missing or older than its source."""
    if binary.exists() and binary.stat().st_mtime >= src.stat().st_mtime:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-g", "-Wall", "-Wextra", f"-std={std}", "-o", str(binary), str(src)]
    log(f"building {what}: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, timeout=120)
    return binary


def build_loadgen() -> Path:
    return build_c(LOADGEN_SRC, LOADGEN_BIN, "gnu11", "load generator")


def build_c_reference() -> Path:
    """The C reference server (bench/c_reference/server.c) into bench/out/ (gitignored)."""
    return build_c(C_REFERENCE_SRC, C_REFERENCE_BIN, "c11", "C reference server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(
    name: str, port: int, connections: int, nats_port: int | None = None, workers: int = 1
) -> list[str]:
    """The server's command line; ``workers`` > 1 (gochan-nats only) adds
    ``--workers N``: a supervisor forking N worker processes (docs/workers.md)."""
    py = sys.executable
    common = ["--host", "127.0.0.1", "--port", str(port)]
    if workers > 1 and name != "gochan-nats":
        raise ValueError(f"{name}: --workers {workers} needs a broker driver (gochan-nats)")
    if name == "gochan-nats":
        assert nats_port is not None
        nats_url = f"nats://127.0.0.1:{nats_port}"
        return [
            *server_command("gochan", port, connections),
            "--driver",
            "nats",
            "--nats-url",
            nats_url,
            *(["--workers", str(workers)] if workers > 1 else []),
        ]
    if name == "gochan":
        limit = str(connections + 1000)
        return [
            py,
            "-m",
            "gochan.server",
            *common,
            "--log-level",
            "warning",
            "--max-connections",
            limit,
            "--max-clients",
            limit,
            # The load generator opens every connection at once, from 16 addresses.
            "--connection-rate-per-peer",
            "0",
        ]
    if name == "sse-starlette":
        return [py, str(BENCH / "peers" / "starlette_peer.py"), *common]
    if name == "c-epoll":
        return [str(C_REFERENCE_BIN), *common]
    if name == "aiohttp-sse":
        return [py, str(BENCH / "peers" / "aiohttp_peer.py"), *common]
    raise ValueError(f"unknown server {name!r}")


def pinned(core: str | None, cmd: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", core, *cmd]


def stop_process(proc: subprocess.Popen[Any], name: str) -> None:
    """SIGTERM, then SIGKILL after a bounded wait; the process group goes too."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            log(f"{name} did not exit after {sig.name}")


@contextlib.contextmanager
def started(
    cmd: list[str], name: str, stdin: int | None = None, stdout: Any = None, stderr: Any = None
) -> Iterator[subprocess.Popen[Any]]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,  # own process group: killpg reaches its children
        text=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc, name)


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server not listening on port {port} after {timeout_s} s")


def child_pids(pid: int) -> list[int]:
    """The children of pid (every thread's), from /proc/PID/task/*/children."""
    kids: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            kids.extend(int(k) for k in children.read_text().split())
    return sorted(set(kids))


def wait_workers(
    proc: subprocess.Popen[Any], workers: int, log_path: Path, timeout_s: float
) -> list[int]:
    """With ``--workers N``: wait until the supervisor (proc) has said
    "gochan listening on" in its log (every worker listens) and has its N
    workers; their pids."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        kids = child_pids(proc.pid)
        if len(kids) == workers and "gochan listening on" in log_path.read_text():
            return kids
        time.sleep(0.1)
    raise RuntimeError(f"{workers} workers not listening after {timeout_s} s")


# ---------------------------------------------------------------- /proc readings


def rss_kib(pid: int) -> int:
    return proc_status(pid, "VmRSS")


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def machine_busy_s() -> float:
    """CPU seconds spent by all processes (user, nice, system; not irq/softirq) since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLK_TCK


def io_counters(pid: int) -> dict[str, int]:
    """read/write syscall counts (syscr/syscw); empty when /proc/PID/io is unreadable."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


# ---------------------------------------------------------------- load generator


class LoadgenError(RuntimeError):
    pass


class Loadgen:
    """Drives sse_loadgen in --control mode: one JSON line per command."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        # Processes on the load side besides the generator (the NATS server
        # it publishes through): their CPU is not counted as noise.
        self.helper_pids: list[int] = []
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ)
        self.buf = ""
        os.set_blocking(proc.stdout.fileno(), False)

    def read_json(self, timeout_s: float) -> Json:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while "\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadgenError(f"no output from load generator within {timeout_s:.0f} s")
            if not self.sel.select(timeout=min(left, 1.0)):
                if self.proc.poll() is not None:
                    raise LoadgenError(f"load generator exited ({self.proc.returncode})")
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                raise LoadgenError(f"load generator closed its output ({self.proc.poll()})")
            self.buf += chunk.decode()
        line, self.buf = self.buf.split("\n", 1)
        record: Json = json.loads(line)
        if record.get("type") == "error":
            raise LoadgenError(record.get("message", "error"))
        return record

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def step(self, rate: float, warmup: float, duration: float, drain: float) -> Json:
        self.command(f"step {rate} {warmup} {duration} {drain}")
        return self.read_json(warmup + duration + drain + 60.0)

    def quit(self) -> Json | None:
        with contextlib.suppress(LoadgenError, BrokenPipeError, OSError):
            self.command("quit")
            return self.read_json(30.0)
        return None


# ---------------------------------------------------------------- one server


@dataclass
class ServerResult:
    name: str
    ok: bool = False
    error: str | None = None
    version: str = ""
    workers: int = 1  # gochan's --workers: the processes summed in its CPU and RSS
    connect: Json = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_peak_kib: int = 0
    steps: list[Json] = field(default_factory=list)

    # ------------------------------------------------ derived metrics
    def ready(self) -> int:
        return int(self.connect.get("ready", 0))

    def kib_per_conn(self) -> float | None:
        if not self.ready():
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.ready()

    def sustained_steps(self) -> list[Json]:
        return [s for s in self.steps if s["sustained"]]

    def max_sustained_deliveries(self) -> float | None:
        steps = self.sustained_steps()
        return max(s["deliveries_per_s"] for s in steps) if steps else None

    def best_rate_p99_100ms(self) -> Json | None:
        good = [s for s in self.sustained_steps() if s["latency_us"]["p99"] < GOOD_P99_US]
        return max(good, key=lambda s: s["rate"]) if good else None

    def light_load(self) -> Json | None:
        """The lowest-rate step, if it is light (<= 300 msgs/s)."""
        light = [s for s in self.steps if s["rate"] <= LIGHT_LOAD_MAX_RATE]
        return min(light, key=lambda s: s["rate"]) if light else None

    def top_step(self) -> Json | None:
        """The step with the most deliveries/s: where the load generator works hardest."""
        return max(self.steps, key=lambda s: s["deliveries_per_s"]) if self.steps else None

    def summary(self) -> Json:
        best = self.best_rate_p99_100ms()
        light = self.light_load()
        top = self.top_step()
        return {
            "max_sustained_deliveries_per_s": self.max_sustained_deliveries(),
            "max_sustained_rate": max((s["rate"] for s in self.sustained_steps()), default=None),
            "best_rate_p99_lt_100ms": best["rate"] if best else None,
            "best_deliveries_p99_lt_100ms": best["deliveries_per_s"] if best else None,
            "light_load_rate": light["rate"] if light else None,
            "light_load_p50_ms": light["latency_us"]["p50"] / 1000 if light else None,
            "light_load_p99_ms": light["latency_us"]["p99"] / 1000 if light else None,
            "kib_per_conn": self.kib_per_conn(),
            "connect_time_s": self.connect.get("connect_time_s"),
            "connected": self.ready(),
            "top_rate": top["rate"] if top else None,
            "top_deliveries_per_s": top["deliveries_per_s"] if top else None,
            "loadgen_cpu_share_top": top["cpu_share"] if top else None,
            "server_cpu_share_top": top.get("server_cpu_share") if top else None,
        }


def judge(step: Json) -> bool:
    target = step["target"]
    return bool(
        step["published"] >= SUSTAINED_DELIVERY_RATIO * target
        and step["expected"] > 0
        and step["delivery_ratio"] >= SUSTAINED_DELIVERY_RATIO
        and step["latency_us"]["p99"] < SUSTAINED_P99_US
        and step["disconnects"] == 0
    )


def cc_version() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        done = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return f"{cc} ?"
    return done.stdout.split("\n", 1)[0].strip() or f"{cc} ?"


def server_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if name == "c-epoll":
        return f"bench/c_reference/server.c, {cc_version()} -O2"
    packages = {
        "gochan": ["gochan", "uvloop", "httptools"],
        "gochan-nats": ["gochan", "uvloop", "httptools", "nats-py"],
        "sse-starlette": ["sse-starlette", "starlette", "uvicorn", "uvloop", "httptools"],
        "aiohttp-sse": ["aiohttp-sse", "aiohttp", "uvloop"],
    }[name]
    parts = []
    for pkg in packages:
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} ?")
    return ", ".join(parts)


def cpu_sum(pids: Sequence[int]) -> float:
    return sum(map(cpu_s, pids))


def syscw_sum(pids: Sequence[int]) -> int | None:
    """Write syscalls of all of pids; None if one is unreadable."""
    counts = [io_counters(p).get("syscw") for p in pids]
    return None if None in counts else sum(c for c in counts if c is not None)


def measure_step(
    name: str, pids: Sequence[int], lg: Loadgen, rate: float, args: argparse.Namespace
) -> Json:
    """One rate step, with the server's CPU and write syscalls and the machine's noise.
    ``pids``: the server's processes (several for the nodes of a cluster), summed."""
    each0 = [cpu_s(p) for p in pids]
    cpu0, io0, t0 = sum(each0), syscw_sum(pids), time.monotonic()
    lg_pids = [lg.proc.pid, *lg.helper_pids]
    lg0, busy0 = sum(map(cpu_s, lg_pids)), machine_busy_s()
    h0 = sum(map(cpu_s, lg.helper_pids))
    step = lg.step(rate, args.warmup, args.duration, args.drain)
    wall = time.monotonic() - t0
    each1 = [cpu_s(p) for p in pids]
    cpu1, io1 = sum(each1), syscw_sum(pids)
    lg1, busy1 = sum(map(cpu_s, lg_pids)), machine_busy_s()
    if len(pids) > 1 and wall > 0:
        # Each process's share over the whole step, in the order of pids.
        step["server_cpu_share_each"] = [(b - a) / wall for a, b in zip(each0, each1, strict=True)]
    if lg.helper_pids:
        step["broker_cpu_share"] = (sum(map(cpu_s, lg.helper_pids)) - h0) / wall if wall else None
    # Server CPU and write syscalls over the measured window (read by the load
    # generator at the window's edges); over the whole step if unavailable.
    if step.get("server_cpu_s", -1) >= 0:
        step["server_cpu_share"] = step["server_cpu_s"] / step["duration_s"]
    else:
        step["server_cpu_share"] = (cpu1 - cpu0) / wall if wall > 0 else None
    # Cores used by everything else on the machine meanwhile: a noise indicator.
    other = (busy1 - busy0) - (cpu1 - cpu0) - (lg1 - lg0)
    step["other_cpu_cores"] = max(other, 0.0) / wall if wall > 0 else None
    total_rx = step["received"] + step["outside_window"]
    if step.get("server_syscw", -1) >= 0 and step["received"]:
        step["server_syscw_per_delivery"] = step["server_syscw"] / step["received"]
    elif io0 is not None and io1 is not None and total_rx:
        step["server_syscw_per_delivery"] = (io1 - io0) / total_rx
    step["sustained"] = judge(step)
    lat = step["latency_us"]
    log(
        f"{name}: rate {rate:>8g}/s published {step['publish_rate']:>9.0f}/s "
        f"deliveries {step['deliveries_per_s']:>10.0f}/s "
        f"ratio {step['delivery_ratio']:.3f} p50 {lat['p50'] / 1000:.1f} ms "
        f"p99 {lat['p99'] / 1000:.1f} ms loadgen cpu {step['cpu_share']:.0%} "
        f"server cpu {step['server_cpu_share']:.0%} "
        f"other cpu {step['other_cpu_cores']:.2f} "
        f"{'ok' if step['sustained'] else 'NOT SUSTAINED'}"
    )
    return step


def settle(pids: Sequence[int]) -> None:
    """After an overloaded step, wait (bounded) until the server has drained its backlog."""
    deadline = time.monotonic() + SETTLE_MAX_S
    calm = 0
    while time.monotonic() < deadline:
        c0 = cpu_sum(pids)
        time.sleep(0.5)
        calm = calm + 1 if (cpu_sum(pids) - c0) / 0.5 < SETTLED_CPU_SHARE else 0
        if calm >= 2:
            return
    log(f"server still busy after {SETTLE_MAX_S:g} s")


def wait_quiet(pids: list[int], max_s: float) -> float:
    """Wait (at most max_s) until other processes use under NOISY_OTHER_CORES for 1 s.

    Returns the seconds waited. On a shared machine this keeps builds and test
    runs of others out of the measured windows when they pause.
    """
    start = time.monotonic()
    while True:
        b0, c0 = machine_busy_s(), sum(cpu_s(p) for p in pids)
        time.sleep(1.0)
        other = (machine_busy_s() - b0) - (sum(cpu_s(p) for p in pids) - c0)
        waited = time.monotonic() - start
        if other < NOISY_OTHER_CORES or waited >= max_s:
            if waited > 1.5:
                log(f"waited {waited:.0f} s for other processes to calm down ({other:.2f} cores)")
            return waited


def step_with_retry(
    name: str,
    servers: Sequence[subprocess.Popen[Any]],
    lg: Loadgen,
    rate: float,
    args: argparse.Namespace,
    pids: Sequence[int] | None = None,
) -> Json:
    """Run a step; retry a failed one once if other processes were busy meanwhile.
    ``servers``: the server's processes (the nodes of a cluster); ``pids``: the
    ones measured, if not theirs (a supervisor and its workers)."""
    attempts: list[Json] = []
    pids = [s.pid for s in servers] if pids is None else list(pids)
    for attempt in range(1 + NOISY_RETRIES):
        for server in servers:
            if server.poll() is not None:
                raise RuntimeError(f"{name} exited with code {server.returncode}")
        waited = wait_quiet([*pids, lg.proc.pid, *lg.helper_pids], args.quiet_wait)
        step = measure_step(name, pids, lg, rate, args)
        step["attempt"] = attempt + 1
        step["waited_for_quiet_s"] = round(waited, 1)
        attempts.append(step)
        noisy = (step["other_cpu_cores"] or 0.0) > NOISY_OTHER_CORES
        if step["sustained"] or not noisy or attempt == NOISY_RETRIES:
            break
        log(f"{name}: other processes used {step['other_cpu_cores']:.2f} cores; retrying")
        settle(pids)
    # A sustained attempt if any, else the least disturbed one.
    return min(attempts, key=lambda s: (not s["sustained"], s["other_cpu_cores"] or 0.0))


def step_through_rates(
    name: str,
    servers: Sequence[subprocess.Popen[Any]],
    lg: Loadgen,
    args: argparse.Namespace,
    pids: Sequence[int] | None = None,
) -> list[Json]:
    """``args.rates`` in turn up to the first step not sustained, then
    ``args.refine`` steps bisecting between the last sustained rate and it.
    ``pids``: the processes measured, if not ``servers``' own."""
    steps: list[Json] = []
    measured = [s.pid for s in servers] if pids is None else list(pids)
    ok_rate: float | None = None
    fail_rate: float | None = None
    for rate in args.rates:
        step = step_with_retry(name, servers, lg, rate, args, measured)
        steps.append(step)
        if not step["sustained"]:
            fail_rate = rate
            break
        ok_rate = rate
        time.sleep(STEP_PAUSE_S)
    # Bisect (geometrically) between the last sustained and the first failed rate.
    for _ in range(args.refine if ok_rate and fail_rate else 0):
        assert ok_rate is not None and fail_rate is not None
        mid = float(f"{math.sqrt(ok_rate * fail_rate):.2g}")
        if not ok_rate < mid < fail_rate:
            break
        settle(measured)
        step = step_with_retry(name, servers, lg, mid, args, measured)
        steps.append(step)
        if step["sustained"]:
            ok_rate = mid
        else:
            fail_rate = mid
    return steps


def loadgen_command(
    loadgen_bin: Path,
    ports: Sequence[int],
    server_pids: Sequence[int],
    args: argparse.Namespace,
    extra: Sequence[str] = (),
) -> list[str]:
    """sse_loadgen in --control mode against ``ports`` (subscribers and
    publishers round-robin over them), sized by ``args``."""
    return pinned(
        args.client_cpu,
        [
            str(loadgen_bin),
            "--control",
            "--ports",
            ",".join(map(str, ports)),
            "--connections",
            str(args.connections),
            "--topics",
            str(args.topics),
            "--per-conn-topics",
            str(args.per_conn_topics),
            "--concurrency",
            str(args.concurrency),
            "--connect-timeout",
            str(args.connect_timeout),
            "--publishers",
            str(args.publishers),
            "--pipeline",
            str(args.pipeline),
            "--max-runtime",
            str(args.max_runtime),
            "--server-pid",
            ",".join(map(str, server_pids)),
            *extra,
        ],
    )


def start_nats(
    stack: contextlib.ExitStack,
    port: int,
    log_path: Path,
    core: str | None,
    extra: Sequence[str] = (),
) -> subprocess.Popen[Any]:
    """A nats-server of the benchmark's own on ``port`` (``extra``: more of
    its flags, such as ``-js``), stopped when ``stack`` closes."""
    nats_bin = shutil.which("nats-server")
    if nats_bin is None:
        raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
    cmd = pinned(core, [nats_bin, "-a", "127.0.0.1", "-p", str(port), *extra])
    log(f"starting {' '.join(cmd)}")
    out = stack.enter_context(log_path.open("w"))
    nats = stack.enter_context(
        started(cmd, "nats-server", stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    )
    wait_listening(port, nats, SERVER_START_TIMEOUT_S)
    return nats


def row_name(name: str, workers: int) -> str:
    """The report's name for a server: gochan-nats with --workers N > 1 is
    ``gochan-nats-wN``, every other row its server's name."""
    return f"{name}-w{workers}" if name == "gochan-nats" and workers > 1 else name


def run_server(
    name: str, args: argparse.Namespace, loadgen_bin: Path, logdir: Path
) -> ServerResult:
    workers = args.workers if name == "gochan-nats" else 1
    label = row_name(name, workers)
    result = ServerResult(name=label, version=server_version(name), workers=workers)
    if name == "c-epoll":
        build_c_reference()
    port = free_port()
    nats_port: int | None = None
    lg_extra: list[str] = []
    worker_pids: list[int] = []
    with contextlib.ExitStack() as stack:

        @stack.callback
        def kill_workers() -> None:
            """Workers left after the supervisor stopped (they are in their own
            process groups, out of reach of its killpg)."""
            for pid in worker_pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

        nats: subprocess.Popen[Any] | None = None
        if name == "gochan-nats":
            # A NATS server of its own, on the load side's core: the publisher
            # sends PUB frames to it, gochan (--driver nats) relays them.
            nats_port = free_port()
            nats = start_nats(
                stack, nats_port, logdir / f"{label}.nats-server.log", args.client_cpu
            )
            lg_extra = ["--nats-port", str(nats_port)]
        cmd = pinned(
            args.server_cpu, server_command(name, port, args.connections, nats_port, workers)
        )
        log(f"{label}: starting on port {port}: {' '.join(cmd)}")
        server_log_path = logdir / f"{label}.log"
        server_log = server_log_path.open("w")
        stack.callback(server_log.close)
        server = stack.enter_context(
            started(cmd, label, stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log)
        )
        wait_listening(port, server, SERVER_START_TIMEOUT_S)
        if workers > 1:
            worker_pids.extend(
                wait_workers(server, workers, server_log_path, SERVER_START_TIMEOUT_S)
            )
            log(f"{label}: supervisor {server.pid}, workers {', '.join(map(str, worker_pids))}")
        # The server's processes: CPU, RSS and syscalls are summed over them.
        pids = [server.pid, *worker_pids]
        time.sleep(0.5)
        result.rss_before_kib = sum(map(rss_kib, pids))

        lg_cmd = loadgen_command(loadgen_bin, [port], pids, args, lg_extra)
        lg_err = (logdir / f"{label}.loadgen.log").open("w")
        stack.callback(lg_err.close)
        lg_proc = stack.enter_context(
            started(
                lg_cmd,
                f"{label} loadgen",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=lg_err,
            )
        )
        lg = Loadgen(lg_proc)
        if nats is not None:
            lg.helper_pids.append(nats.pid)
        result.connect = lg.read_json(args.connect_timeout + 30.0)
        log(
            f"{label}: {result.ready()}/{args.connections} connected in "
            f"{result.connect['connect_time_s']:.2f} s"
        )
        time.sleep(SETTLE_S)
        result.rss_after_kib = sum(map(rss_kib, pids))

        result.steps = step_through_rates(label, [server], lg, args, pids)
        result.rss_peak_kib = sum(proc_status(p, "VmHWM") for p in pids)
        lg.quit()
        result.ok = True
    return result


# ---------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ROWS: tuple[tuple[str, str, str, str], ...] = (
    # key, label, format, which is better ("" = not a figure of merit: no ratio)
    ("max_sustained_deliveries_per_s", "max sustained deliveries/s", ",.0f", "higher"),
    ("max_sustained_rate", "  at publish rate (msgs/s)", ",.0f", "higher"),
    ("best_deliveries_p99_lt_100ms", "best deliveries/s with p99<100ms", ",.0f", "higher"),
    ("best_rate_p99_lt_100ms", "  at publish rate (msgs/s)", ",.0f", "higher"),
    ("light_load_rate", "light load: publish rate (msgs/s)", ",.0f", ""),
    ("light_load_p50_ms", "light-load p50 (ms)", ".2f", "lower"),
    ("light_load_p99_ms", "light-load p99 (ms)", ".2f", "lower"),
    ("kib_per_conn", "RSS per idle connection (KiB)", ".1f", "lower"),
    ("connect_time_s", "connect time, all conns (s)", ".2f", "lower"),
    ("connected", "connections ready", ",.0f", "higher"),
    ("top_deliveries_per_s", "busiest step: deliveries/s", ",.0f", ""),
    ("top_rate", "busiest step: publish rate (msgs/s)", ",.0f", ""),
    ("server_cpu_share_top", "busiest step: server CPU share", ".0%", ""),
    ("loadgen_cpu_share_top", "busiest step: loadgen CPU share", ".0%", ""),
)


def table(results: list[ServerResult]) -> str:
    names = [r.name for r in results]
    sums = {r.name: r.summary() for r in results}
    peers = [n for n in names if not n.startswith("gochan")] if "gochan" in names else []
    header = ["metric", "better", *names, *(f"gochan/{p}" for p in peers)]
    rows = [header]
    if any(r.workers > 1 for r in results):
        rows.append(
            [
                "gochan worker processes",
                "",
                *(str(r.workers) if r.name.startswith("gochan") else "-" for r in results),
                *("" for _ in peers),
            ]
        )
    for key, label, spec, better in ROWS:
        row = [label, better]
        for n in names:
            value = sums[n][key]
            row.append(fmt(value, spec))
        for p in peers:
            if not better:
                row.append("")
                continue
            g, v = sums["gochan"][key], sums[p][key]
            ratio = (
                g / v if isinstance(g, int | float) and isinstance(v, int | float) and v else None
            )
            row.append(fmt(ratio, ".2f") + ("x" if ratio is not None else ""))
        rows.append(row)
    return aligned(rows)


def aligned(rows: list[list[str]]) -> str:
    """A text table: the first column left-aligned, the others right, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def steps_table(results: list[ServerResult]) -> str:
    lines = [
        f"{'server':<14} {'rate/s':>8} {'published/s':>11} {'deliveries/s':>12} {'ratio':>6} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'srv cpu':>7} {'lg cpu':>6} "
        f"{'other':>5}  ok"
    ]
    for r in results:
        for s in sorted(r.steps, key=lambda s: s["rate"]):
            lat = s["latency_us"]
            lines.append(
                f"{r.name:<14} {s['rate']:>8,.0f} {s['publish_rate']:>11,.0f} "
                f"{s['deliveries_per_s']:>12,.0f} {s['delivery_ratio']:>6.3f} "
                f"{lat['p50'] / 1000:>8.2f} {lat['p90'] / 1000:>8.2f} {lat['p99'] / 1000:>8.2f} "
                f"{lat['max'] / 1000:>8.1f} {fmt(s.get('server_cpu_share'), '.0%'):>7} "
                f"{s['cpu_share']:>6.0%} {fmt(s.get('other_cpu_cores'), '.2f'):>5}  "
                f"{'yes' if s['sustained'] else 'no'}"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive numbers, comma-separated")
    return rates


def add_load_arguments(p: argparse.ArgumentParser, server_cpu: str, client_cpu: str) -> None:
    """The workload's and the load generator's options, shared with bench/cluster.py;
    the ones left None here are set by :func:`fill_load_defaults`."""
    p.add_argument("--topics", type=int, default=None, help="default 1000 (or the workload's)")
    p.add_argument(
        "--per-conn-topics", type=int, default=None, help="default 10 (or the workload's)"
    )
    p.add_argument("--duration", type=float, default=None, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per step")
    p.add_argument("--drain", type=float, default=3.0, help="max seconds to wait for stragglers")
    p.add_argument("--rates", type=parse_rates, default=None, help="publish rates, msgs/s")
    p.add_argument(
        "--refine", type=int, default=None, help="bisection steps after the first failure"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="max seconds to wait before a step for other processes to go idle",
    )
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    p.add_argument("--connect-timeout", type=float, default=180.0)
    p.add_argument("--publishers", type=int, default=4, help="publisher connections")
    p.add_argument("--pipeline", type=int, default=1000, help="requests in flight per publisher")
    p.add_argument("--server-cpu", default=server_cpu, help="core for the server ('' = no pinning)")
    p.add_argument("--client-cpu", default=client_cpu, help="core for the load generator")
    p.add_argument("--max-runtime", type=float, default=1800.0, help="per-server cap, seconds")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")


def fill_load_defaults(args: argparse.Namespace, quick: bool) -> None:
    _, topics, per_conn = WORKLOADS["1000topics"]
    if args.topics is None:
        args.topics = topics
    if args.per_conn_topics is None:
        args.per_conn_topics = per_conn
    if args.duration is None:
        args.duration = 2.0 if quick else 5.0
    if args.warmup is None:
        args.warmup = 0.5 if quick else 2.0
    if args.rates is None:
        args.rates = list(QUICK_RATES if quick else DEFAULT_RATES)
    if args.refine is None:
        args.refine = 0 if quick else 2
    args.server_cpu = args.server_cpu or None
    args.client_cpu = args.client_cpu or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1,000 connections, 3 short steps")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated subset")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="1000topics", help="see above")
    p.add_argument(
        "--connections", type=int, default=None, help="default the workload's (quick 1000)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gochan-nats: python -m gochan.server --workers N (a supervisor and N\n"
        "worker processes, docs/workers.md; row gochan-nats-wN); give them the\n"
        "cores too, e.g. --server-cpu 0,1. gochan (mem driver) refuses N > 1",
    )
    add_load_arguments(p, server_cpu="0", client_cpu="1")
    args = p.parse_args(argv)
    connections, topics, per_conn = WORKLOADS[args.workload]
    if args.connections is None:
        args.connections = min(QUICK_CONNECTIONS, connections) if args.quick else connections
    if args.topics is None:
        args.topics = topics
    if args.per_conn_topics is None:
        args.per_conn_topics = per_conn
    fill_load_defaults(args, args.quick)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))} (known: {', '.join(SERVERS)})")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.workers > 1 and "gochan" in args.servers:
        p.error(
            f"--workers {args.workers}: gochan (the mem driver) runs in one process only; "
            "use --servers gochan-nats"
        )
    return args


def cpu_count_of(spec: str) -> int:
    """How many cores a taskset list names ("0", "0,1", "0-3,6")."""
    cores: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return len(cores)


def raise_fd_limit(needed: int) -> None:
    """Servers and the load generator inherit our limit: each needs one fd per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        raise SystemExit(f"ulimit -n is below {needed}: raise it or lower --connections")


def git_commit() -> str | None:
    """The working tree's commit (short), with "+dirty" if it has changes; None outside git."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def proc_meminfo(key: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def write_chart(report: Json, png: Path) -> Path | None:
    """The report's chart (bench/chart.py) next to its JSON; None if matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("no chart: matplotlib is not installed (pip install -e '.[bench]')")
        return None
    sys.path.insert(0, str(BENCH))
    try:
        import chart
    finally:
        sys.path.remove(str(BENCH))
    try:
        path: Path = chart.draw(report, png)
    except (KeyError, TypeError, ValueError, OSError) as exc:
        log(f"no chart: {exc!r}")
        return None
    return path


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    raise_fd_limit(args.connections + 200)
    # SIGTERM unwinds like Ctrl-C, so the context managers kill what we started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.workers > 1 and args.server_cpu and cpu_count_of(args.server_cpu) < args.workers:
        log(
            f"WARNING: {args.workers} workers pinned to {cpu_count_of(args.server_cpu)} core(s) "
            f"(--server-cpu {args.server_cpu}): they share it"
        )
    loadgen_bin = build_loadgen()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = RESULTS / f"logs-{stamp}"
    logdir.mkdir()
    name = "" if args.workload == "1000topics" else f"{args.workload}-"
    out = args.out or RESULTS / f"compare-{name}{stamp}{'-quick' if args.quick else ''}.json"

    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    results: list[ServerResult] = []
    try:
        for name in args.servers:
            try:
                results.append(run_server(name, args, loadgen_bin, logdir))
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                label = row_name(name, args.workers)
                log(f"{label}: FAILED: {exc}")
                workers = args.workers if name == "gochan-nats" else 1
                results.append(ServerResult(name=label, error=str(exc), workers=workers))
    except KeyboardInterrupt:
        log("interrupted; processes stopped")
        return 130

    report: Json = {
        "started_at": started_at,
        "command": shlex.join(["python", "bench/compare.py", *given]),
        "commit": git_commit(),
        "workload": {
            "name": args.workload,
            "connections": args.connections,
            "topics": args.topics,
            "per_conn_topics": args.per_conn_topics,
            "subscribers_per_topic": args.connections * args.per_conn_topics / args.topics,
            "rates": args.rates,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "drain_s": args.drain,
            "refine": args.refine,
            "publishers": args.publishers,
            "pipeline": args.pipeline,
            "server_cpu": args.server_cpu,
            "client_cpu": args.client_cpu,
            "workers": args.workers,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu_model": cpu_model(),
            "mem_total_kib": proc_meminfo("MemTotal"),
            "loadavg_at_start": loadavg_start,
        },
        "criteria": {
            "sustained": f"published >= {SUSTAINED_DELIVERY_RATIO:.0%} of target, deliveries "
            f">= {SUSTAINED_DELIVERY_RATIO:.0%} of expected, p99 < "
            f"{SUSTAINED_P99_US / 1e6:g} s, no disconnects",
        },
        "servers": {
            r.name: {
                "ok": r.ok,
                "error": r.error,
                "version": r.version,
                "workers": r.workers,
                "summary": r.summary(),
                "connect": r.connect,
                "rss_before_kib": r.rss_before_kib,
                "rss_after_kib": r.rss_after_kib,
                "rss_peak_kib": r.rss_peak_kib,
                "steps": r.steps,
            }
            for r in results
        },
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    chart = write_chart(report, out.with_suffix(".png"))
    print()
    print(
        f"{args.workload}: {args.connections} connections x {args.per_conn_topics} topics of "
        f"{args.topics} ({report['workload']['subscribers_per_topic']:g} subscribers/topic), "
        f"{args.duration:g} s steps"
    )
    print()
    print(steps_table(results))
    print()
    print(table(results))
    for r in results:
        print(f"{r.name}: {r.version}" + (f"  ERROR: {r.error}" if r.error else ""))
        top = r.top_step()
        if top and top["cpu_share"] > LOADGEN_SATURATED_SHARE:
            print(
                f"WARNING: {r.name}: load generator used {top['cpu_share']:.0%} of its core at "
                "the busiest step: it may be the bottleneck there"
            )
        noisy = [s["rate"] for s in r.steps if (s["other_cpu_cores"] or 0) > NOISY_OTHER_CORES]
        if noisy:
            print(
                f"NOTE: {r.name}: other processes used > {NOISY_OTHER_CORES} cores during "
                f"steps at {', '.join(f'{x:g}' for x in noisy)} msgs/s (noisy figures)"
            )
    print(f"\nJSON: {shown(out)}")
    if chart is not None:
        print(f"chart: {shown(chart)}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
