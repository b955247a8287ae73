"""Connect cost: C connections opened and answered, per server, and the
server's own CPU for it.

Each round starts every server in turn on a free port, lets compare.py's load
generator open ``--connections`` streams (``--concurrency`` in flight, each
naming ``--per-conn-topics`` of ``--topics`` topics) and stops it once every
stream has its first frame. It reports the wall time of that and the server's
user and system CPU over it (from /proc), and each figure as a ratio to the C
reference server's in the same round. Rounds alternate the order of the
servers, so a noisy moment does not fall on one of them every time.

The servers:

- ``c-epoll``: bench/c_reference/server.c, the machine's limit;
- ``uvloop-floor``: bench/peers/uvloop_floor.py, one asyncio Protocol on
  uvloop that answers every GET /events with a fixed head and a random id and
  does nothing else: the least any Python server on uvloop pays per connect;
- ``core-floor``: the same with ``--core``: it also subscribes each stream to
  its topics through gochan's Cython hub (what is left of gochan's connect
  with no routing, validation, limits or client);
- ``gochan``: ``python -m gochan.server`` as compare.py runs it (mem driver);
- ``gochan-slow-connect``: the same with ``--no-fast-connect``: every
  connect parsed by httptools and answered by the events route;
- ``gochan-nats``: the same as ``gochan`` on the NATS driver, with a
  nats-server of its own on the load generator's core (a stream is answered
  once the server has its topics' SUBs);
- ``sse-starlette``, ``aiohttp-sse``: the Python peers, when asked for.

Usage::

    python bench/connect.py                      # 3 rounds, 10,000 connections
    python bench/connect.py --rounds 5 --servers c-epoll,uvloop-floor,gochan,aiohttp-sse
    python bench/connect.py --servers c-epoll,gochan,gochan-nats --topics 10000 --per-conn-topics 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # bench/ is not a package: found through sys.path

SERVERS = (
    "c-epoll",
    "uvloop-floor",
    "core-floor",
    "gochan",
    "gochan-slow-connect",
    "gochan-nats",
    "sse-starlette",
    "aiohttp-sse",
)
DEFAULT_SERVERS = ("c-epoll", "uvloop-floor", "gochan")
FLOOR = compare.BENCH / "peers" / "uvloop_floor.py"
REFERENCE = "c-epoll"


def command(name: str, port: int, connections: int, nats_port: int | None) -> list[str]:
    if name in ("uvloop-floor", "core-floor"):
        core = ["--core"] if name == "core-floor" else []
        return [sys.executable, str(FLOOR), "--host", "127.0.0.1", "--port", str(port), *core]
    if name == "gochan-slow-connect":
        return [*compare.server_command("gochan", port, connections), "--no-fast-connect"]
    return compare.server_command(name, port, connections, nats_port)


def utime_stime(pid: int) -> tuple[float, float]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / compare.CLK_TCK, int(fields[12]) / compare.CLK_TCK


def measure(name: str, args: argparse.Namespace, loadgen: Path, logdir: Path) -> dict[str, Any]:
    """One server, one connect phase: wall time, server user/sys CPU."""
    port = compare.free_port()
    with contextlib.ExitStack() as stack:
        nats_port: int | None = None
        if name == "gochan-nats":  # a nats-server of its own, on the load side's core
            nats_port = compare.free_port()
            compare.start_nats(stack, nats_port, logdir / f"{name}.nats.log", args.client_cpu)
        cmd = compare.pinned(args.server_cpu, command(name, port, args.connections, nats_port))
        server_log = stack.enter_context((logdir / f"{name}.log").open("w"))
        server = stack.enter_context(
            compare.started(
                cmd, name, stdin=subprocess.DEVNULL, stdout=server_log, stderr=server_log
            )
        )
        compare.wait_listening(port, server, compare.SERVER_START_TIMEOUT_S)
        time.sleep(0.5)
        lg_args = argparse.Namespace(**vars(args), publishers=1, pipeline=1, max_runtime=600.0)
        lg_cmd = compare.loadgen_command(loadgen, [port], [server.pid], lg_args)
        lg_err = stack.enter_context((logdir / f"{name}.loadgen.log").open("w"))
        user0, sys0 = utime_stime(server.pid)
        lg_proc = stack.enter_context(
            compare.started(
                lg_cmd,
                f"{name} loadgen",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=lg_err,
            )
        )
        lg = compare.Loadgen(lg_proc)
        record = lg.read_json(args.connect_timeout + 30.0)
        user1, sys1 = utime_stime(server.pid)
        lg.quit()
        if record.get("ready", 0) < args.connections:
            compare.log(f"{name}: only {record.get('ready', 0)}/{args.connections} connected")
    return {
        "server": name,
        "connections": args.connections,
        "ready": record.get("ready", 0),
        "connect_time_s": record["connect_time_s"],
        "server_user_s": user1 - user0,
        "server_sys_s": sys1 - sys0,
        "ready_latency_us": record.get("ready_latency_us"),
    }


def report(runs: list[dict[str, Any]], servers: list[str]) -> str:
    """Medians per server, and their ratios to the reference server's."""

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["server"] == name)

    ref = REFERENCE if REFERENCE in servers else None
    rows = [["server", "connect (s)", "x C", "user CPU (s)", "sys CPU (s)", "CPU x C"]]
    for name in servers:
        wall, user, sys_ = (
            median(name, k) for k in ("connect_time_s", "server_user_s", "server_sys_s")
        )
        if ref is None:
            ratio = cpu_ratio = "-"
        else:
            ref_cpu = median(ref, "server_user_s") + median(ref, "server_sys_s")
            ratio = f"{wall / median(ref, 'connect_time_s'):.2f}"
            cpu_ratio = f"{(user + sys_) / ref_cpu:.2f}" if ref_cpu > 0 else "-"
        rows.append([name, f"{wall:.2f}", ratio, f"{user:.2f}", f"{sys_:.2f}", cpu_ratio])
    return compare.aligned(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS), help="comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--topics", type=int, default=1000)
    p.add_argument("--per-conn-topics", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=100, help="connects in flight")
    p.add_argument("--connect-timeout", type=float, default=180.0)
    p.add_argument("--server-cpu", default="0", help="taskset core list for the server")
    p.add_argument("--client-cpu", default="1", help="taskset core list for the load generator")
    args = p.parse_args(argv)
    args.servers = [s for s in args.servers.split(",") if s]
    unknown = set(args.servers) - set(SERVERS)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))} (known: {', '.join(SERVERS)})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    compare.raise_fd_limit(args.connections + 200)
    loadgen = compare.build_loadgen()
    if REFERENCE in args.servers:
        compare.build_c_reference()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logdir = compare.RESULTS / f"connect-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for k in range(args.rounds):
        order = args.servers if k % 2 == 0 else args.servers[::-1]
        for name in order:
            run = measure(name, args, loadgen, logdir)
            run["round"] = k + 1
            runs.append(run)
            compare.log(
                f"round {k + 1} {name}: {run['ready']}/{run['connections']} in "
                f"{run['connect_time_s']:.2f} s, server user {run['server_user_s']:.2f} s "
                f"sys {run['server_sys_s']:.2f} s"
            )
    (logdir / "connect.json").write_text(json.dumps(runs, indent=1))
    print(report(runs, args.servers))
    compare.log(f"results in {logdir}")


if __name__ == "__main__":
    main()
