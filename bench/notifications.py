"""Per-message profile driver: the "notifications" workload against gochan, with a profiler.

C connections, each subscribed to K of T topics (defaults: 10,000 connections,
10,000 topics x 1 subscriber), and compare.py's load generator publishing at one
fixed rate R through pipelined ``POST /publish?topic=TopicN`` (or through NATS with
``--server gochan-nats``). Everything is compare.py's building blocks (server
command, pinning, load generator control); this script only adds the fixed-rate
windows and a profiler attached to the server for the second one:

1. a clean window (no profiler): the server's CPU seconds over the measured window
   (``/proc/PID/stat`` utime + stime, read by the load generator at the window's
   edges) divided by the messages published in it: CPU per message;
2. a profiled window of the same length with ``--profiler`` attached (py-spy
   ``record --native``, or ``perf record -g``); its output goes to ``--out-dir``
   (default bench/out/, gitignored). The profiler costs the server time, so the
   per-message CPU of window 1 is the figure; window 2 gives the shares.

Usage:
    python bench/notifications.py                                   # 10,000 x 1, 10,000 msgs/s
    python bench/notifications.py --connections 2000 --topics 1000 --per-conn-topics 10 \\
        --rate 3000                                                 # 20 subscribers per topic
    python bench/notifications.py --profiler none --duration 10     # CPU per message only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # bench/ is not a package: found through sys.path

OUT = compare.BENCH / "out"

# python -c: time every collection (gc.callbacks) and print the totals at exit,
# then run gochan.server as -m would.
GC_TIMER = """
import atexit, gc, runpy, sys, time
n = [0, 0, 0]; spent = [0.0, 0.0, 0.0]; t0 = [0.0]
def timer(phase, info):
    if phase == "start":
        t0[0] = time.perf_counter()
    else:
        g = info["generation"]; n[g] += 1; spent[g] += time.perf_counter() - t0[0]
gc.callbacks.append(timer)
atexit.register(lambda: print("gc-stats", n, [round(s, 4) for s in spent], file=sys.stderr))
sys.argv[0] = "gochan.server"
runpy.run_module("gochan.server", run_name="__main__", alter_sys=True)
"""


def utime_stime(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / compare.CLK_TCK, int(fields[12]) / compare.CLK_TCK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--server", default="gochan", choices=("gochan", "gochan-nats"))
    p.add_argument("--connections", type=int, default=10000)
    p.add_argument("--topics", type=int, default=10000)
    p.add_argument("--per-conn-topics", type=int, default=1)
    p.add_argument("--rate", type=float, default=10000.0, help="publish rate, msgs/s")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per window")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per window")
    p.add_argument("--drain", type=float, default=3.0)
    p.add_argument(
        "--profiler",
        default="py-spy",
        choices=("py-spy", "perf", "none"),
        help="attached to the server during the second window",
    )
    p.add_argument("--py-spy-rate", type=int, default=250, help="samples/s")
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--pipeline", type=int, default=1000)
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--client-cpu", default="1")
    p.add_argument(
        "--gc-stats",
        action="store_true",
        help="run the server under a gc.callbacks timer; it prints collections and seconds at exit",
    )
    p.add_argument("--out-dir", type=Path, default=OUT)
    p.add_argument("--tag", default=None, help="file name stem (default: workload and time)")
    return p.parse_args(argv)


def profiler_command(args: argparse.Namespace, pid: int, stem: Path) -> list[str] | None:
    seconds = str(round(args.duration))
    if args.profiler == "py-spy":
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("py-spy is not installed (pip install py-spy)")
        return [
            exe,
            "record",
            "--native",
            "--rate",
            str(args.py_spy_rate),
            "--format",
            "raw",
            "-o",
            f"{stem}.pyspy.txt",
            "-p",
            str(pid),
            "-d",
            seconds,
        ]
    if args.profiler == "perf":
        return [
            "perf",
            "record",
            "-e",
            "cpu-clock",
            "-g",
            "-o",
            f"{stem}.perf.data",
            "-p",
            str(pid),
            "--",
            "sleep",
            seconds,
        ]
    return None


def window(
    lg: compare.Loadgen, pid: int, args: argparse.Namespace, profile: list[str] | None
) -> dict[str, Any]:
    """One fixed-rate step; the profiler (if any) runs over its measured part."""
    cpu0, t0, us0 = compare.cpu_s(pid), time.monotonic(), utime_stime(pid)
    busy0 = compare.machine_busy_s()
    lg_cpu0 = compare.cpu_s(lg.proc.pid) + sum(map(compare.cpu_s, lg.helper_pids))
    lg.command(f"step {args.rate} {args.warmup} {args.duration} {args.drain}")
    prof: subprocess.Popen[Any] | None = None
    if profile is not None:
        time.sleep(args.warmup)
        compare.log(f"profiling: {' '.join(profile)}")
        prof = subprocess.Popen(profile, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    step = lg.read_json(args.warmup + args.duration + args.drain + 60.0)
    if prof is not None:
        try:
            _, err = prof.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            prof.kill()
            _, err = prof.communicate()
        if prof.returncode:
            compare.log(f"profiler exited {prof.returncode}: {err.decode()[-500:]}")
    wall = time.monotonic() - t0
    lg_cpu = compare.cpu_s(lg.proc.pid) + sum(map(compare.cpu_s, lg.helper_pids)) - lg_cpu0
    server_cpu = compare.cpu_s(pid) - cpu0
    other = compare.machine_busy_s() - busy0 - server_cpu - lg_cpu
    us1 = utime_stime(pid)
    step["server_utime_s"], step["server_stime_s"] = us1[0] - us0[0], us1[1] - us0[1]
    published = step["published"]
    win_cpu = step["server_cpu_s"]
    step["server_cpu_share"] = win_cpu / step["duration_s"]
    step["server_cpu_us_per_msg"] = win_cpu / published * 1e6 if published else None
    received = step["received"]
    step["server_cpu_us_per_delivery"] = win_cpu / received * 1e6 if received else None
    step["other_cpu_cores"] = max(other, 0.0) / wall
    step["profiled"] = profile is not None
    lat = step["latency_us"]
    compare.log(
        f"{'profiled' if profile else 'clean'} window: published {step['publish_rate']:.0f}/s "
        f"deliveries {step['deliveries_per_s']:.0f}/s ratio {step['delivery_ratio']:.3f} "
        f"p50 {lat['p50'] / 1000:.2f} ms p99 {lat['p99'] / 1000:.2f} ms "
        f"server cpu {step['server_cpu_share']:.0%} = {step['server_cpu_us_per_msg']:.1f} us/msg "
        f"(utime+stime {win_cpu:.2f} s / {published} msgs) "
        f"loadgen cpu {step['cpu_share']:.0%} other {step['other_cpu_cores']:.2f} cores; "
        f"whole step: user {step['server_utime_s']:.2f} s sys {step['server_stime_s']:.2f} s"
    )
    return step


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    subs = args.connections * args.per_conn_topics // args.topics
    stem = args.out_dir / (
        args.tag or f"notifications-{args.server}-{args.topics}x{subs}-{time.strftime('%H%M%S')}"
    )
    compare.raise_fd_limit(args.connections + 200)
    loadgen = compare.build_loadgen()
    port = compare.free_port()
    with contextlib.ExitStack() as stack:
        lg_extra: list[str] = []
        nats_port: int | None = None
        helpers: list[int] = []
        if args.server == "gochan-nats":
            nats_bin = shutil.which("nats-server")
            if nats_bin is None:
                raise SystemExit("nats-server is not installed")
            nats_port = compare.free_port()
            nats_cmd = compare.pinned(
                args.client_cpu, [nats_bin, "-a", "127.0.0.1", "-p", str(nats_port)]
            )
            nats = stack.enter_context(
                compare.started(
                    nats_cmd,
                    "nats-server",
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            compare.wait_listening(nats_port, nats, compare.SERVER_START_TIMEOUT_S)
            helpers.append(nats.pid)
            lg_extra = ["--nats-port", str(nats_port)]
        cmd = compare.pinned(
            args.server_cpu,
            compare.server_command(args.server, port, args.connections, nats_port),
        )
        if args.gc_stats:
            at = cmd.index("-m")
            cmd[at : at + 2] = ["-c", GC_TIMER]
        compare.log(f"starting {' '.join(cmd)}")
        server_log = stack.enter_context(Path(f"{stem}.server.log").open("w"))
        server = stack.enter_context(
            compare.started(
                cmd, args.server, stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log
            )
        )
        compare.wait_listening(port, server, compare.SERVER_START_TIMEOUT_S)
        # The python process under taskset: taskset execs, so the pid is the server's.
        pid = server.pid
        lg_cmd = compare.pinned(
            args.client_cpu,
            [
                str(loadgen),
                "--control",
                "--port",
                str(port),
                "--connections",
                str(args.connections),
                "--topics",
                str(args.topics),
                "--per-conn-topics",
                str(args.per_conn_topics),
                "--publishers",
                str(args.publishers),
                "--pipeline",
                str(args.pipeline),
                "--server-pid",
                str(pid),
                *lg_extra,
            ],
        )
        lg_log = stack.enter_context(Path(f"{stem}.loadgen.log").open("w"))
        lg_proc = stack.enter_context(
            compare.started(
                lg_cmd, "loadgen", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lg_log
            )
        )
        lg = compare.Loadgen(lg_proc)
        lg.helper_pids.extend(helpers)
        connect = lg.read_json(240.0)
        compare.log(
            f"{connect.get('ready')}/{args.connections} ready in {connect['connect_time_s']:.2f} s "
            f"({subs} subscribers per topic)"
        )
        time.sleep(compare.SETTLE_S)
        idle0 = compare.cpu_s(pid)
        time.sleep(2.0)
        idle_share = (compare.cpu_s(pid) - idle0) / 2.0
        compare.log(f"idle server cpu {idle_share:.1%}")
        clean = window(lg, pid, args, None)
        profiled = None
        prof_cmd = profiler_command(args, pid, stem)
        if prof_cmd is not None:
            time.sleep(compare.STEP_PAUSE_S)
            profiled = window(lg, pid, args, prof_cmd)
        lg.quit()
        report = {
            "command": sys.argv,
            "args": {k: str(v) for k, v in vars(args).items()},
            "commit": compare.git_commit(),
            "connect": connect,
            "idle_server_cpu_share": idle_share,
            "clean": clean,
            "profiled": profiled,
        }
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1))
        compare.log(f"wrote {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
