"""gochan nodes on one NATS server (JetStream on), with and without ``--cluster``.

Two parts, each on a NATS server of its own started here (``nats-server -js``
on a free loopback port, its store in a temporary directory, its monitoring
port on for the message counts):

1. **throughput**: compare.py's "1000topics" workload against 1, 2 and 4
   cluster nodes (``--nodes``). The load generator's connections go
   round-robin over the nodes' ports, and so do its publishers (POST
   /publish, which goes through JetStream to every node holding the topic).
   Rates step up as in compare.py until a step is not sustained (same
   criteria, same p99 < 100 ms "usable" bound). Each step records the CPU of
   all nodes together, of the NATS server and of the load generator.
2. **cost**: what ``--cluster`` adds per operation, the same storms against
   ``--cost-nodes`` nodes with ``--cluster`` off then on:
   - a connect storm (the load generator's connect phase: ``--storm-connections``
     new clients, one topic each, ``--storm-concurrency`` in flight, round-robin
     over the nodes); its clients stay until the end;
   - an update storm: ``--updates`` POST /update_subscriptions from
     ``--update-concurrency`` closed-loop workers, over ``--update-streams``
     clients with a stream open, each update adding or removing one topic.
     With ``--cluster`` half of them go to a node that does not hold the
     client's stream; without it, all to the holding node (a plain node knows
     only its own clients);
   - ``--hold-s`` seconds idle with every client held: what holding costs
     (heartbeats, and each node touching the records it holds, a slice each
     second) and how late ``GET /healthz`` is answered meanwhile;
   - the disconnect (RST) of the connect storm's clients.
   Before the storms a stream on every node holds every topic they use, so no
   storm opens a JetStream consumer. Per operation: µs of CPU of the nodes
   and of the NATS server, latency p50/p99, and the messages the nodes'
   cluster-store connections sent to NATS (``in_msgs`` of ``/connz``:
   key-value requests and node-to-node messages), each less what the same
   processes do idle over as long, measured (2 s) just before the storm
   with the clients held then.

Nothing is pinned by default (``--server-cpu``/``--client-cpu`` pin every
node / the load generator and NATS server as compare.py does): on a 2-core
machine the nodes, the NATS server and the load generator share the cores,
and the per-step CPU shares say how.

Usage:
    python bench/cluster.py                 # both parts, about 4 minutes
    python bench/cluster.py --quick         # a smoke run, under a minute
    python bench/cluster.py --parts cost --cost-nodes 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # bench/ is not a package: found through sys.path

Json = compare.Json

CLUSTER_NAME = "bench"
NATS_PREFIX = "bench."
NATS_STREAM = "BENCH"
DEFAULT_NODES = (1, 2, 4)
DEFAULT_RATES = (300, 1000, 1500, 2000, 3000, 4000, 6000)
DEFAULT_DURATION_S = 5.0
QUICK_RATES = (50, 200)

READY_TIMEOUT_S = 20.0  # every node ready and hearing every other
IDLE_S = 2.0  # the idle baseline's window
HTTP_TIMEOUT_S = 10.0
PROBE_S = 0.05  # GET /healthz on every node this often while the clients are held
STORM_TOPIC = "Topic"  # the storms' topics, named as the load generator names them
CLIENT_ID = re.compile(rb'"client_id":"([^"]+)"')


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    nodes: list[subprocess.Popen[Any]]
    ports: list[int]
    node_ids: list[str]
    nats: subprocess.Popen[Any]
    monitor_port: int

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.nodes]


def node_command(
    node_id: str, port: int, nats_port: int, connections: int, cluster: bool, jetstream: bool
) -> list[str]:
    """compare.py's gochan command on the NATS driver (with JetStream unless
    not ``jetstream``), as one node."""
    limit = str(connections + 1000)
    return [
        *compare.server_command("gochan", port, connections),
        "--max-clients-per-peer",
        limit,
        "--max-connections-per-peer",
        limit,
        "--driver",
        "nats",
        "--nats-url",
        f"nats://127.0.0.1:{nats_port}",
        "--nats-prefix",
        NATS_PREFIX,
        *(["--nats-jetstream", "--nats-stream", NATS_STREAM] if jetstream else []),
        "--nats-name",
        f"driver-{node_id}",  # tells its connection apart in /connz
        "--node-id",
        node_id,
        *(["--cluster", "--cluster-name", CLUSTER_NAME] if cluster else []),
    ]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT_S
        ) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(c: Cluster, cluster: bool) -> None:
    """Every node answers /readyz 200 and, in a cluster, names every node as live."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        answers = [http_get(p, "/readyz") for p in c.ports]
        if all(status == 200 for status, _ in answers) and (
            not cluster
            or all(set(c.node_ids) <= set(body.rsplit("nodes", 1)[-1].split())
                   for _, body in answers)
        ):  # fmt: skip
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"nodes not ready after {READY_TIMEOUT_S:g} s: {answers}")
        time.sleep(0.2)


@contextlib.contextmanager
def running_cluster(
    n: int, cluster: bool, connections: int, args: argparse.Namespace, logdir: Path, tag: str
) -> Iterator[Cluster]:
    """A fresh NATS server (JetStream, store in a temporary directory) and n
    nodes on it, started one after the other; all stopped on exit."""
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(tempfile.TemporaryDirectory(prefix="gochan-bench-js-"))
        nats_port, monitor_port = compare.free_port(), compare.free_port()
        nats = compare.start_nats(
            stack,
            nats_port,
            logdir / f"{tag}.nats-server.log",
            args.client_cpu,
            ["-js", "-sd", store, "-m", str(monitor_port)],
        )
        nodes, ports, ids = [], [], []
        for k in range(n):
            node_id, port = f"n{k}", compare.free_port()
            cmd = compare.pinned(
                args.server_cpu,
                node_command(node_id, port, nats_port, connections, cluster, args.jetstream),
            )
            log(f"{tag}: starting {node_id} on port {port}: {shlex.join(cmd)}")
            out = stack.enter_context((logdir / f"{tag}.{node_id}.log").open("w"))
            proc = stack.enter_context(
                compare.started(cmd, node_id, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            )
            compare.wait_listening(port, proc, compare.SERVER_START_TIMEOUT_S)
            nodes.append(proc)
            ports.append(port)
            ids.append(node_id)
        c = Cluster(nodes, ports, ids, nats, monitor_port)
        wait_ready(c, cluster)
        yield c


@contextlib.contextmanager
def loadgen(
    cmd: list[str], name: str, logdir: Path, helper_pids: Sequence[int] = ()
) -> Iterator[compare.Loadgen]:
    with contextlib.ExitStack() as stack:
        err = stack.enter_context((logdir / f"{name}.loadgen.log").open("w"))
        proc = stack.enter_context(
            compare.started(cmd, name, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        )
        lg = compare.Loadgen(proc)
        lg.helper_pids.extend(helper_pids)
        yield lg


def storm_args(args: argparse.Namespace, connections: int) -> argparse.Namespace:
    """Load generator options for a storm: ``connections`` on one topic each of
    ``--storm-topics``, no publishing."""
    return argparse.Namespace(
        **{
            **vars(args),
            "connections": connections,
            "topics": args.storm_topics,
            "per_conn_topics": 1,
            "concurrency": args.storm_concurrency,
            "publishers": 1,
        }
    )


# ---------------------------------------------------------------- readings


def nats_counts(monitor_port: int) -> Json:
    """NATS messages received: in all (/varz), and from the nodes' cluster-store
    connections and driver connections (/connz, by connection name)."""
    _, varz = http_get(monitor_port, "/varz")
    _, connz = http_get(monitor_port, "/connz?limit=100000")
    conns = json.loads(connz).get("connections", [])

    def sent_by(prefix: str) -> int:
        return sum(c["in_msgs"] for c in conns if str(c.get("name", "")).startswith(prefix))

    return {
        "in_msgs": json.loads(varz)["in_msgs"],
        "store_msgs": sent_by("gochan-cluster-"),
        "driver_msgs": sent_by("driver-"),
    }


@dataclass
class Reading:
    t: float
    nodes_cpu_s: float
    nats_cpu_s: float
    counts: Json


def read(c: Cluster) -> Reading:
    return Reading(
        time.monotonic(), compare.cpu_sum(c.pids), compare.cpu_s(c.nats.pid),
        nats_counts(c.monitor_port),
    )  # fmt: skip


@dataclass
class Baseline:
    """What the cluster does idle, per second (heartbeats, record touches,
    JetStream consumer heartbeats), taken off each storm's figures."""

    nodes_cpu: float
    nats_cpu: float
    counts: dict[str, float]

    @classmethod
    def measure(cls, c: Cluster) -> Baseline:
        a = read(c)
        time.sleep(IDLE_S)
        b = read(c)
        wall = b.t - a.t
        return cls(
            (b.nodes_cpu_s - a.nodes_cpu_s) / wall,
            (b.nats_cpu_s - a.nats_cpu_s) / wall,
            {k: (b.counts[k] - a.counts[k]) / wall for k in a.counts},
        )


def per_op(a: Reading, b: Reading, base: Baseline, ops: int) -> Json:
    """µs of CPU and NATS messages per operation between two readings, less the idle baseline."""
    wall = b.t - a.t
    if ops <= 0:
        return {"ops": ops, "wall_s": wall}
    nodes = (b.nodes_cpu_s - a.nodes_cpu_s) - base.nodes_cpu * wall
    nats = (b.nats_cpu_s - a.nats_cpu_s) - base.nats_cpu * wall
    msgs = {
        f"{k}_per_op": ((b.counts[k] - a.counts[k]) - base.counts[k] * wall) / ops for k in a.counts
    }
    return {
        "ops": ops,
        "wall_s": round(wall, 3),
        "nodes_cpu_s": round(b.nodes_cpu_s - a.nodes_cpu_s, 3),
        "nats_cpu_s": round(b.nats_cpu_s - a.nats_cpu_s, 3),
        "nodes_cpu_us_per_op": nodes / ops * 1e6,
        "nats_cpu_us_per_op": nats / ops * 1e6,
        "nodes_cpu_share": (b.nodes_cpu_s - a.nodes_cpu_s) / wall,
        "nats_cpu_share": (b.nats_cpu_s - a.nats_cpu_s) / wall,
        **msgs,
    }


# ---------------------------------------------------------------- part 1: throughput


def run_throughput(n: int, args: argparse.Namespace, loadgen_bin: Path, logdir: Path) -> Json:
    name = f"{n} node{'s' if n > 1 else ''}"
    tag = f"nodes{n}"
    result = compare.ServerResult(name=name, version=compare.server_version("gochan-nats"))
    with running_cluster(n, args.cluster, args.connections, args, logdir, tag) as c:
        time.sleep(0.5)
        result.rss_before_kib = sum(compare.rss_kib(p) for p in c.pids)
        cmd = compare.loadgen_command(loadgen_bin, c.ports, c.pids, args)
        with loadgen(cmd, tag, logdir, [c.nats.pid]) as lg:
            result.connect = lg.read_json(args.connect_timeout + 30.0)
            log(
                f"{name}: {result.ready()}/{args.connections} connected in "
                f"{result.connect['connect_time_s']:.2f} s"
            )
            time.sleep(compare.SETTLE_S)
            result.rss_after_kib = sum(compare.rss_kib(p) for p in c.pids)
            result.steps = compare.step_through_rates(name, c.nodes, lg, args)
            result.rss_peak_kib = sum(compare.proc_status(p, "VmHWM") for p in c.pids)
            lg.quit()
        result.ok = True
    summary = result.summary()
    connect_s = result.connect.get("connect_time_s")
    summary["connects_per_s"] = result.ready() / connect_s if connect_s else None
    top = result.top_step()
    summary["broker_cpu_share_top"] = top.get("broker_cpu_share") if top else None
    summary["other_cpu_cores_top"] = top.get("other_cpu_cores") if top else None
    return {
        "nodes": n,
        "name": name,
        "ok": result.ok,
        "version": result.version,
        "summary": summary,
        "connect": result.connect,
        "rss_before_kib": result.rss_before_kib,
        "rss_after_kib": result.rss_after_kib,
        "rss_peak_kib": result.rss_peak_kib,
        "steps": result.steps,
    }


# ---------------------------------------------------------------- part 2: cost


def quantiles_ms(samples_ns: list[int]) -> Json:
    if not samples_ns:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    s = sorted(samples_ns)

    def q(x: float) -> float:
        return s[min(len(s) - 1, int(x * len(s)))] / 1e6

    return {"count": len(s), "p50": q(0.5), "p99": q(0.99), "max": s[-1] / 1e6}


class Http:
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def open_stream(port: int, topic: str) -> tuple[str, asyncio.StreamWriter, asyncio.Task[Any]]:
    """GET /events?topic=..: the new client's id, the connection, and a task
    that reads the stream to its end."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /events?topic={topic} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    buf = b""
    while (found := CLIENT_ID.search(buf)) is None:
        chunk = await reader.read(65536)
        if not chunk:
            raise RuntimeError(f"stream on port {port} closed before its first frame: {buf!r}")
        buf += chunk

    async def drain() -> None:
        while await reader.read(65536):
            pass

    return found.group(1).decode(), writer, asyncio.get_running_loop().create_task(drain())


async def update_storm(
    c: Cluster, base: Baseline, cluster: bool, args: argparse.Namespace, client_ids: list[str]
) -> Json:
    """``--updates`` updates over the clients (the i-th with a stream on node
    i mod n); each adds or removes (in turn) one topic its node already holds.
    With ``cluster``, every other update goes to a node that does not hold the
    client's stream."""
    n = len(c.ports)
    topics = args.storm_topics
    clients = [(client_id, i % n) for i, client_id in enumerate(client_ids)]
    added = [False] * len(clients)
    latencies: dict[str, list[int]] = {"holder": [], "other": []}
    failures: list[str] = []
    counter = iter(range(args.updates))
    workers = min(args.update_concurrency, len(clients))

    async def worker(w: int) -> None:
        conns = [Http(port) for port in c.ports]
        mine = list(range(w, len(clients), workers))  # no two workers share a client
        try:
            for j, i in zip(counter, itertools.cycle(mine), strict=False):
                client_id, holder = clients[i]
                remote = cluster and n > 1 and j % 2 == 1
                node = (holder + 1) % n if remote else holder
                topic = f"{STORM_TOPIC}{(i + 1) % topics}"
                change = "remove" if added[i] else "add"
                body = json.dumps({"client_id": client_id, change: [topic]}).encode()
                t0 = time.perf_counter_ns()
                status, answer = await conns[node].request("POST", "/update_subscriptions", body)
                latencies["other" if remote else "holder"].append(time.perf_counter_ns() - t0)
                held = status == 200 and topic in json.loads(answer).get("subscriptions", ())
                if status != 200 or held != (change == "add"):
                    failures.append(f"{status} {answer[:200]!r}")
                added[i] = held
        finally:
            for h in conns:
                h.close()

    cpu0 = time.process_time()
    a = read(c)
    await asyncio.gather(*(worker(w) for w in range(workers)))
    b = read(c)
    client_cpu = time.process_time() - cpu0
    everything = latencies["holder"] + latencies["other"]
    result = per_op(a, b, base, len(everything))
    result.update(
        {
            "per_s": len(everything) / result["wall_s"] if result["wall_s"] else None,
            "latency_ms": quantiles_ms(everything),
            "latency_ms_to_holder": quantiles_ms(latencies["holder"]),
            "latency_ms_to_other_node": quantiles_ms(latencies["other"]),
            "failures": len(failures),
            "failure_examples": failures[:5],
            "client_cpu_share": client_cpu / result["wall_s"] if result["wall_s"] else None,
        }
    )
    return result


async def hold(c: Cluster, held: int, seconds: float) -> Json:
    """What ``held`` clients cost while nothing happens (heartbeats, and the
    record touches: every node rewrites the records it holds), and how late
    ``GET /healthz`` is answered meanwhile, probed on every node every
    PROBE_S: a stalled event loop shows there."""
    probes: list[int] = []
    loop = asyncio.get_running_loop()

    async def probe(port: int) -> None:
        h = Http(port)
        deadline = loop.time() + seconds
        try:
            while loop.time() < deadline:
                t0 = time.perf_counter_ns()
                status, _ = await h.request("GET", "/healthz")
                probes.append(time.perf_counter_ns() - t0)
                if status != 200:
                    raise RuntimeError(f"/healthz on port {port}: {status}")
                await asyncio.sleep(PROBE_S)
        finally:
            h.close()

    a = read(c)
    await asyncio.gather(*(probe(p) for p in c.ports))
    b = read(c)
    wall = b.t - a.t
    standing: Json = {
        "held_clients": held,
        "wall_s": round(wall, 3),
        "nodes_cpu_share": (b.nodes_cpu_s - a.nodes_cpu_s) / wall,
        "nats_cpu_share": (b.nats_cpu_s - a.nats_cpu_s) / wall,
        "store_msgs_per_s": (b.counts["store_msgs"] - a.counts["store_msgs"]) / wall,
        "in_msgs_per_s": (b.counts["in_msgs"] - a.counts["in_msgs"]) / wall,
        "healthz_ms": quantiles_ms(probes),
    }
    standing["store_msgs_per_client_per_s"] = standing["store_msgs_per_s"] / held
    return standing


async def updates_then_hold(
    c: Cluster, base: Baseline, cluster: bool, args: argparse.Namespace, held_before: int
) -> tuple[Json, Json | None]:
    """Open ``--update-streams`` streams (round-robin over the nodes), run the
    update storm over their clients, then :func:`hold` with every client held."""
    n = len(c.ports)
    opened = [
        await open_stream(c.ports[i % n], f"{STORM_TOPIC}{i % args.storm_topics}")
        for i in range(args.update_streams)
    ]
    try:
        # Blocking the loop meanwhile is harmless: nothing is published.
        base = Baseline.measure(c)
        updates = await update_storm(c, base, cluster, args, [cid for cid, _, _ in opened])
        standing = None
        if args.hold_s > 0:
            standing = await hold(c, held_before + len(opened), args.hold_s)
    finally:
        for _, writer, task in opened:
            writer.close()
            task.cancel()
        await asyncio.gather(*(t for _, _, t in opened), return_exceptions=True)
    return updates, standing


def run_cost(cluster: bool, args: argparse.Namespace, loadgen_bin: Path, logdir: Path) -> Json:
    n = args.cost_nodes
    tag = f"cost-{'on' if cluster else 'off'}"
    sized = args.storm_connections + args.update_streams + n * args.storm_topics
    out: Json = {"cluster": cluster, "nodes": n}
    with running_cluster(n, cluster, sized, args, logdir, tag) as c, contextlib.ExitStack() as st:
        # Every storm topic held on every node before the storms.
        for k, port in enumerate(c.ports):
            hold = storm_args(args, args.storm_topics)
            cmd = compare.loadgen_command(loadgen_bin, [port], [c.pids[k]], hold)
            lg = st.enter_context(loadgen(cmd, f"{tag}.hold-n{k}", logdir))
            ready = lg.read_json(args.connect_timeout + 30.0)["ready"]
            if ready != args.storm_topics:
                raise RuntimeError(f"{tag}: {ready}/{args.storm_topics} holding streams on n{k}")
        time.sleep(compare.SETTLE_S)
        base = Baseline.measure(c)
        out["idle"] = {"nodes_cpu_share": base.nodes_cpu, "nats_cpu_share": base.nats_cpu,
                       "nats_msgs_per_s": base.counts}  # fmt: skip

        # Connect storm, then its disconnects (RST from the load generator).
        storm = storm_args(args, args.storm_connections)
        cmd = compare.loadgen_command(loadgen_bin, c.ports, c.pids, storm)
        a = read(c)
        with loadgen(cmd, f"{tag}.storm", logdir) as lg:
            connect = lg.read_json(args.connect_timeout + 30.0)
            b = read(c)
            ready = int(connect["ready"])
            figures = per_op(a, b, base, ready)
            figures["per_s"] = (
                ready / connect["connect_time_s"] if connect["connect_time_s"] else None
            )
            figures["failed"] = connect["failed"]
            lat = connect["ready_latency_us"]
            figures["latency_ms"] = {"p50": lat["p50"] / 1000, "p99": lat["p99"] / 1000,
                                     "max": lat["max"] / 1000}  # fmt: skip
            out["connect"] = figures
            log(f"{tag}: connect storm: {describe(figures)}")

            # The updates, and the idle hold, with the storm's clients still connected.
            held = ready + n * args.storm_topics
            updates, standing = asyncio.run(updates_then_hold(c, base, cluster, args, held))
            out["update"] = updates
            out["hold"] = standing
            log(f"{tag}: update storm: {describe(updates)}")
            if updates["failures"]:
                log(f"{tag}: {updates['failures']} updates failed: {updates['failure_examples']}")
            if standing:
                log(f"{tag}: held idle: {standing}")

            base = Baseline.measure(c)
            a = read(c)
            lg.quit()
        compare.settle(c.pids)
        b = read(c)
        out["disconnect"] = per_op(a, b, base, ready)
        log(f"{tag}: disconnects: {describe(out['disconnect'])}")
    return out


def describe(f: Json) -> str:
    lat = f.get("latency_ms") or {}
    return (
        f"{f['ops']} ops in {f['wall_s']:.2f} s, nodes {f.get('nodes_cpu_us_per_op', 0):.0f} "
        f"µs/op, nats {f.get('nats_cpu_us_per_op', 0):.0f} µs/op, store msgs "
        f"{f.get('store_msgs_per_op', 0):.2f}/op"
        + (f", p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms" if lat.get("p50") else "")
    )


# ---------------------------------------------------------------- report


def fmtv(value: Any, spec: str) -> str:
    return compare.fmt(value, spec) if isinstance(value, int | float) else "-"


THROUGHPUT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("max_sustained_deliveries_per_s", "max sustained deliveries/s (p99<1s)", ",.0f"),
    ("max_sustained_rate", "  at publish rate (msgs/s)", ",.0f"),
    ("best_deliveries_p99_lt_100ms", "best deliveries/s with p99<100ms", ",.0f"),
    ("best_rate_p99_lt_100ms", "  at publish rate (msgs/s)", ",.0f"),
    ("light_load_p50_ms", "light-load p50 (ms)", ".2f"),
    ("light_load_p99_ms", "light-load p99 (ms)", ".2f"),
    ("connects_per_s", "connects/s (all connections)", ",.0f"),
    ("connect_time_s", "connect time (s)", ".2f"),
    ("top_deliveries_per_s", "busiest step: deliveries/s", ",.0f"),
    ("server_cpu_share_top", "busiest step: nodes CPU (cores)", ".2f"),
    ("broker_cpu_share_top", "busiest step: nats-server CPU (cores)", ".2f"),
    ("loadgen_cpu_share_top", "busiest step: loadgen CPU (cores)", ".2f"),
    ("other_cpu_cores_top", "busiest step: other processes (cores)", ".2f"),
)
SCALING = {"max_sustained_deliveries_per_s", "best_deliveries_p99_lt_100ms", "connects_per_s"}


def throughput_table(runs: list[Json]) -> str:
    first = runs[0]
    others = runs[1:]
    rows = [
        ["metric", *(r["name"] for r in runs), *(f"{r['nodes']}/{first['nodes']}" for r in others)]
    ]
    for key, label, spec in THROUGHPUT_ROWS:
        row = [label, *(fmtv(r["summary"].get(key), spec) for r in runs)]
        for r in others:
            v, v0 = r["summary"].get(key), first["summary"].get(key)
            row.append(f"{v / v0:.2f}x" if key in SCALING and v and v0 else "")
        rows.append(row)
    return compare.aligned(rows)


COST_ROWS: tuple[tuple[str, str, str], ...] = (
    ("nodes_cpu_us_per_op", "gochan CPU, µs/op (all nodes)", ".0f"),
    ("nats_cpu_us_per_op", "nats-server CPU, µs/op", ".0f"),
    ("latency_ms.p50", "latency p50 (ms)", ".2f"),
    ("latency_ms.p99", "latency p99 (ms)", ".2f"),
    ("per_s", "operations/s", ",.0f"),
    ("store_msgs_per_op", "cluster-store msgs to NATS /op", ".2f"),
    ("in_msgs_per_op", "all msgs to NATS /op", ".2f"),
)


def dig(d: Json, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def cost_table(off: Json, on: Json) -> str:
    rows = [["operation / metric", "cluster off", "cluster on", "on - off"]]
    for op, title in (
        ("connect", "connect (new client, 1 topic)"),
        ("disconnect", "disconnect (RST)"),
        ("update", "update_subscriptions (on: half to another node)"),
    ):
        rows.append([title, "", "", ""])
        for key, label, spec in COST_ROWS:
            if op == "disconnect" and key.startswith(("latency", "per_s")):
                continue
            a, b = dig(off.get(op, {}), key), dig(on.get(op, {}), key)
            diff = b - a if isinstance(a, int | float) and isinstance(b, int | float) else None
            rows.append(["  " + label, fmtv(a, spec), fmtv(b, spec), fmtv(diff, "+" + spec)])
    standing = [x.get("hold") for x in (off, on)]
    if standing[0] and standing[1]:
        rows.append(
            [f"idle {standing[1]['wall_s']:.0f} s, {standing[1]['held_clients']} clients held",
             "", "", ""]
        )  # fmt: skip
        for key, label, spec in (
            ("store_msgs_per_s", "cluster-store msgs to NATS /s", ",.1f"),
            ("in_msgs_per_s", "all msgs to NATS /s", ",.1f"),
            ("nodes_cpu_share", "gochan CPU (cores, all nodes)", ".3f"),
            ("nats_cpu_share", "nats-server CPU (cores)", ".3f"),
            ("healthz_ms.p99", "GET /healthz p99 (ms)", ".2f"),
            ("healthz_ms.max", "GET /healthz max (ms)", ".2f"),
        ):
            a, b = dig(standing[0], key), dig(standing[1], key)
            rows.append(["  " + label, fmtv(a, spec), fmtv(b, spec), fmtv(b - a, "+" + spec)])
    if on.get("update", {}).get("latency_ms_to_other_node", {}).get("count"):
        for which in ("to_holder", "to_other_node"):
            lat = on["update"][f"latency_ms_{which}"]
            rows.append(
                [f"  on: update sent {which.replace('_', ' ')}, p50 / p99 (ms)", "",
                 f"{lat['p50']:.2f} / {lat['p99']:.2f}", ""]
            )  # fmt: skip
    return compare.aligned(rows)


# ---------------------------------------------------------------- main


def parse_int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("positive integers, comma-separated")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")
    p.add_argument("--parts", default="throughput,cost", help="throughput, cost or both")
    p.add_argument("--nodes", type=parse_int_list, default=None, help="default 1,2,4")
    p.add_argument("--connections", type=int, default=None, help="default 4000 (quick 200)")
    p.add_argument(
        "--cluster",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the throughput part's nodes run with --cluster (the cost part runs both ways)",
    )
    p.add_argument(
        "--jetstream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the nodes' driver publishes and subscribes through JetStream (--nats-jetstream); "
        "--no-jetstream: core NATS (the cluster store stays a JetStream key-value bucket)",
    )
    compare.add_load_arguments(p, server_cpu="", client_cpu="")
    # Publishes spread over the nodes, 4 connections each at 4 nodes.
    p.set_defaults(publishers=16, pipeline=100, refine=1)
    g = p.add_argument_group("cost")
    g.add_argument("--cost-nodes", type=int, default=2, help="nodes of the cost part")
    g.add_argument("--storm-connections", type=int, default=None, help="default 2000 (quick 100)")
    g.add_argument("--storm-topics", type=int, default=100)
    g.add_argument("--storm-concurrency", type=int, default=50, help="connects in flight")
    g.add_argument("--updates", type=int, default=None, help="default 2000 (quick 100)")
    g.add_argument("--update-streams", type=int, default=None, help="default 200 (quick 20)")
    g.add_argument("--update-concurrency", type=int, default=16, help="updates in flight")
    g.add_argument(
        "--hold-s",
        type=float,
        default=None,
        help="after the update storm, seconds to watch the held clients idle (0: not at all; "
        "default 10, quick 0)",
    )
    args = p.parse_args(argv)
    quick = args.quick
    if args.rates is None:
        args.rates = list(QUICK_RATES if quick else DEFAULT_RATES)
    if args.warmup is None:
        args.warmup = 0.3 if quick else 1.0
    if args.duration is None:
        args.duration = 1.0 if quick else DEFAULT_DURATION_S
    compare.fill_load_defaults(args, quick)
    args.nodes = args.nodes or ([1, 2] if quick else list(DEFAULT_NODES))
    args.connections = args.connections or (200 if quick else 4000)
    args.storm_connections = args.storm_connections or (100 if quick else 2000)
    args.updates = args.updates or (100 if quick else 2000)
    if args.hold_s is None:
        args.hold_s = 0.0 if quick else 10.0
    args.update_streams = args.update_streams or (20 if quick else 200)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if set(args.parts) - {"throughput", "cost"}:
        p.error("--parts: throughput, cost")
    return args


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    compare.raise_fd_limit(max(args.connections, args.storm_connections) + 1000)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    loadgen_bin = compare.build_loadgen()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    compare.RESULTS.mkdir(parents=True, exist_ok=True)
    logdir = compare.RESULTS / f"cluster-logs-{stamp}"
    logdir.mkdir()
    out = args.out or compare.RESULTS / f"cluster-{stamp}{'-quick' if args.quick else ''}.json"
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    throughput: list[Json] = []
    cost: dict[str, Json] = {}
    errors: list[str] = []
    try:
        if "throughput" in args.parts:
            for n in args.nodes:
                try:
                    throughput.append(run_throughput(n, args, loadgen_bin, logdir))
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                    log(f"{n} nodes: FAILED: {exc}")
                    errors.append(f"throughput, {n} nodes: {exc}")
        if "cost" in args.parts:
            for on in (False, True):
                key = "on" if on else "off"
                try:
                    cost[key] = run_cost(on, args, loadgen_bin, logdir)
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                    log(f"cost, cluster {key}: FAILED: {exc}")
                    errors.append(f"cost, cluster {key}: {exc}")
    except KeyboardInterrupt:
        log("interrupted; processes stopped")
        return 130
    failed_updates = sum(c.get("update", {}).get("failures", 0) for c in cost.values())
    report: Json = {
        "started_at": started_at,
        "command": shlex.join(["python", "bench/cluster.py", *given]),
        "commit": compare.git_commit(),
        "workload": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "cpu_model": compare.cpu_model(),
            "mem_total_kib": compare.proc_meminfo("MemTotal"),
        },
        "criteria": {
            "sustained": f"published >= {compare.SUSTAINED_DELIVERY_RATIO:.0%} of target, "
            f"deliveries >= {compare.SUSTAINED_DELIVERY_RATIO:.0%} of expected, p99 < "
            f"{compare.SUSTAINED_P99_US / 1e6:g} s, no disconnects",
        },
        "throughput": throughput,
        "cost": cost,
        "errors": errors,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    if throughput:
        print(
            f"throughput: {args.connections} connections x {args.per_conn_topics} topics of "
            f"{args.topics}, round-robin over the nodes; {args.duration:g} s steps"
        )
        print()
        print(compare.steps_table([steps_view(r) for r in throughput]))
        print()
        print(throughput_table(throughput))
        print()
    if "off" in cost and "on" in cost:
        print(
            f"cost: {args.cost_nodes} nodes; {args.storm_connections} connects "
            f"({args.storm_concurrency} in flight); {args.updates} updates over "
            f"{args.update_streams} clients ({args.update_concurrency} in flight)"
        )
        print()
        print(cost_table(cost["off"], cost["on"]))
    for e in errors:
        print(f"ERROR: {e}")
    if failed_updates:
        print(f"ERROR: {failed_updates} updates failed (see the JSON)")
    print(f"\nJSON: {compare.shown(out)}")
    return 0 if not errors and not failed_updates else 1


def steps_view(run: Json) -> compare.ServerResult:
    return compare.ServerResult(name=run["name"], steps=run["steps"])


if __name__ == "__main__":
    sys.exit(main())
