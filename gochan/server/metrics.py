"""The counters one HTTP front end keeps (the raw server, or the ASGI
adapter: each its own), and ``GET /metrics`` made of them and the
streamer's figures by prometheus-client.

Nothing on the message path calls prometheus-client: the hub, the streamer
and the driver keep plain counters (and the fan-out core its two fixed-bucket
histograms), and a collector reads them when a scrape asks. Each front end
has its own registry, so two servers in one process never collide, and the
page is Prometheus text or OpenMetrics, as the scraper's ``Accept`` asks.
Every family is listed in docs/metrics.md.
"""

from __future__ import annotations

import os
import resource
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest

from .._fast import LATENCY_BUCKETS_S, STREAM_DURATION_BUCKETS_S, Histogram
from ..errors import InterfaceError

if TYPE_CHECKING:
    from ..streamer import Streamer

__all__ = ["Metrics", "MetricsCollector", "ProcessCollector"]

# The refusal reason of a request answered with an error status and closed
# (Metrics.malformed); any other status counts as "bad_request".
MALFORMED_REASONS = {
    408: "request_timeout",
    413: "body_too_large",
    431: "headers_too_large",
    500: "internal_error",
}

# (name, help, stats key, unit): read from Streamer.stats() at each scrape.
GAUGES = (
    ("gochan_streams", "Open event streams (every front end of the streamer)",
     "connections", ""),
    ("gochan_clients", "Known clients, connected or within their TTL", "clients", ""),
    ("gochan_topics", "Topics with at least one local stream", "topics", ""),
    ("gochan_driver_subscriptions", "Broker subscriptions held (one per topic)",
     "driver_subscriptions", ""),
    ("gochan_history_messages", "Messages kept in memory for replay", "history_messages", ""),
    ("gochan_history_bytes", "Bytes of frames kept in memory for replay",
     "history_bytes", "bytes"),
)  # fmt: skip
COUNTERS = (
    ("gochan_messages_published_total", "Messages published through gochan (POST /publish, "
     "Streamer.publish)", "published", ""),
    ("gochan_messages_in_total", "Messages received from the driver", "messages_in", ""),
    ("gochan_deliveries_total", "Message frames queued to streams (one per message per stream)",
     "deliveries", ""),
    ("gochan_writes_total", "Writes to stream sockets (frames coalesced per write)",
     "writes", ""),
    ("gochan_written_bytes_total", "Bytes written to stream sockets", "bytes_written", "bytes"),
    ("gochan_streams_opened_total", "Event streams opened", "streams_opened", ""),
    ("gochan_slow_consumer_disconnects_total",
     "Streams cut because their unsent output passed max_pending_bytes", "slow_disconnects", ""),
    ("gochan_subscription_failures_total", "Broker subscriptions that failed or were lost",
     "subscription_failures", ""),
    ("gochan_clients_created_total", "Clients created", "clients_created", ""),
    ("gochan_clients_expired_total", "Clients removed when their TTL ran out",
     "clients_expired", ""),
    ("gochan_replay_hits_total", "Reconnects (Last-Event-ID) replayed with nothing lost",
     "replay_hits", ""),
    ("gochan_replay_misses_total", "Reconnects (Last-Event-ID) that could not be replayed",
     "replay_misses", ""),
)  # fmt: skip


class Metrics:
    """Connections and refusals counted by one front end, and its registry:
    :meth:`exposition` is the answer to ``GET /metrics``."""

    __slots__ = (
        "bad_requests",
        "connections",
        "connections_refused",
        "connections_total",
        "peer_refusals",
        "refusals",
        "registry",
        "streamer",
    )

    def __init__(self, streamer: Streamer) -> None:
        self.streamer = streamer
        self.connections = 0  # open TCP connections (requests, behind ASGI), streams included
        self.connections_total = 0  # accepted or refused
        self.connections_refused = 0
        self.peer_refusals = 0
        self.bad_requests = 0
        self.refusals: Counter[str] = Counter()  # requests refused, by reason
        self.registry = CollectorRegistry()
        self.registry.register(MetricsCollector(self))
        # The process's own figures, in this registry rather than the global one.
        self.registry.register(ProcessCollector())
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)  # registers itself only where gc has stats

    def refuse(self, reason: str) -> None:
        """Count one request or connection refused for ``reason``: a short
        fixed word such as ``"max_connections"`` or ``"forbidden"``, never
        anything the client sent (it becomes a label value)."""
        self.refusals[reason] += 1

    def malformed(self, status: int) -> None:
        """Count one request refused as malformed, over a size limit or too
        slow, answered with ``status`` before the connection closes."""
        self.bad_requests += 1
        self.refuse(MALFORMED_REASONS.get(status, "bad_request"))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The page and its Content-Type: OpenMetrics when ``accept`` (the
        scraper's ``Accept`` header) asks for ``application/openmetrics-text``,
        else Prometheus text."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def render(self) -> str:
        """The page as Prometheus text."""
        return generate_latest(self.registry).decode()


class MetricsCollector:
    """Reads one front end's :class:`Metrics` and its streamer's counters
    (hub, driver, replay) at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        from .. import __version__  # gochan imports this module before it defines it

        self.metrics = metrics
        self.version = __version__

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        streamer = metrics.streamer
        stats = streamer.stats()
        driver: dict[str, Any] = stats.get("driver") or {}
        driver_name = str(driver.get("driver", streamer.driver.name))
        yield InfoMetricFamily("gochan_build", "gochan's version", {"version": self.version})
        yield GaugeMetricFamily(
            "gochan_connections",
            "Open connections of this front end, streams included (behind ASGI: requests "
            "in flight)",
            metrics.connections,
        )
        counters = (
            ("gochan_connections_accepted_total", "Connections admitted by this front end",
             metrics.connections_total - metrics.connections_refused),
            ("gochan_connections_refused_total",
             "Connections refused by this front end (limits, shutting down)",
             metrics.connections_refused),
            ("gochan_peer_connections_refused_total",
             "Connections refused for one address's share (max_connections_per_peer)",
             metrics.peer_refusals),
            ("gochan_bad_requests_total", "Requests refused as malformed", metrics.bad_requests),
        )  # fmt: skip
        for name, help_text, value in counters:
            yield CounterMetricFamily(name, help_text, value)
        refusals = CounterMetricFamily(
            "gochan_refusals_total",
            "Requests and connections refused by this front end, by reason",
            labels=("reason",),
        )
        for reason, count in sorted(metrics.refusals.items()):
            refusals.add_metric((reason,), count)
        yield refusals
        for name, help_text, key, unit in GAUGES:
            yield GaugeMetricFamily(name, help_text, stats.get(key, 0), unit=unit)
        for name, help_text, key, unit in COUNTERS:
            yield CounterMetricFamily(name, help_text, stats.get(key, 0), unit=unit)
        ready = GaugeMetricFamily(
            "gochan_driver_ready", "1 when the driver is connected to its broker",
            labels=("driver",),
        )  # fmt: skip
        ready.add_metric((driver_name,), int(streamer.ready))
        yield ready
        for name, help_text, key in (
            ("gochan_broker_reconnects_total",
             "Broker connections restored after a loss", "reconnects"),
            ("gochan_broker_stray_messages_total",
             "Broker messages for topics this node does not hold, dropped", "stray"),
        ):  # fmt: skip
            family = CounterMetricFamily(name, help_text, labels=("driver",))
            family.add_metric((driver_name,), int(driver.get(key, 0)))
            yield family
        cluster: dict[str, Any] | None = stats.get("cluster")
        if cluster is not None:
            yield from _cluster_families(cluster)
        try:
            latency, durations = streamer.hub.latency, streamer.hub.durations
        except InterfaceError:  # not started yet: the same buckets, empty
            latency, durations = Histogram(LATENCY_BUCKETS_S), Histogram(STREAM_DURATION_BUCKETS_S)
        yield _histogram(
            "gochan_message_fanout_seconds",
            "Time from a message reaching the streamer to the end of its fan-out write "
            "to its streams' sockets, per message",
            latency,
        )
        yield _histogram(
            "gochan_stream_duration_seconds",
            "How long event streams lasted, observed when each one ends",
            durations,
        )


def _cluster_families(cluster: dict[str, Any]) -> Iterator[Metric]:
    """This node's view of its cluster (docs/cluster.md)."""
    yield InfoMetricFamily(
        "gochan_cluster_node",
        "This node's name in its cluster and the cluster store it uses",
        {"node_id": str(cluster["node_id"]), "store": str(cluster["store"])},
    )
    for name, help_text, key in (
        ("gochan_cluster_store_up", "1 while the cluster store is reachable", "store_up"),
        ("gochan_cluster_nodes", "Nodes heard on the cluster store in the last 3 s, "
         "this one included", "nodes"),
        ("gochan_cluster_held_clients", "Clients with a stream on this node, as the "
         "cluster store lists them", "held_clients"),
    ):  # fmt: skip
        yield GaugeMetricFamily(name, help_text, int(cluster[key]))
    for name, help_text, key in (
        ("gochan_cluster_updates_total", "Subscription updates this node wrote to the "
         "cluster store", "updates"),
        ("gochan_cluster_remote_applies_total", "Updates other nodes asked this node to apply",
         "remote_applies"),
        ("gochan_cluster_ack_timeouts_total", "Updates answered 504: a holder did not "
         "acknowledge within cluster_timeout", "ack_timeouts"),
        ("gochan_cluster_conflicts_total", "Compare-and-set writes that lost a race and "
         "were retried", "conflicts"),
        ("gochan_cluster_attaches_total", "Streams opened here for a client read from the "
         "cluster store", "attaches"),
        ("gochan_cluster_expired_total", "Clients this node deleted from the store when "
         "their TTL ran out", "expired"),
        ("gochan_cluster_store_errors_total", "Background cluster store operations that "
         "failed", "store_errors"),
    ):  # fmt: skip
        yield CounterMetricFamily(name, help_text, int(cluster[key]))


def _histogram(name: str, help_text: str, source: Histogram) -> HistogramMetricFamily:
    bounds, cumulative, total = source.snapshot()
    buckets = [(repr(b), n) for b, n in zip(bounds, cumulative, strict=False)]
    buckets.append(("+Inf", cumulative[-1]))
    return HistogramMetricFamily(name, help_text, buckets, total, unit="seconds")


class ProcessCollector:
    """The ``process_*`` families of prometheus-client's ProcessCollector
    (memory, CPU, start time, descriptors), read from /proc at each scrape,
    with the open descriptors counted without listing them: prometheus-
    client lists /proc/self/fd, 15 ms of the event loop per scrape with
    10,000 streams open; Linux 6.2 and later give the count as the size of
    that directory. Nothing where there is no /proc."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = Path(proc)
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.page = resource.getpagesize()
        try:
            stat = (self.proc / "stat").read_text()
            self.boot_time = next(
                float(line.split()[1]) for line in stat.splitlines() if line.startswith("btime ")
            )
        except (OSError, StopIteration, ValueError):
            self.boot_time = 0.0  # no /proc: nothing to report

    def collect(self) -> Iterator[Metric]:
        if not self.boot_time:
            return
        me = self.proc / "self"
        try:
            stat = (me / "stat").read_bytes()
            fds = os.stat(me / "fd").st_size or len(os.listdir(me / "fd"))
        except OSError:
            return
        # Fields after the command name (which may hold spaces and parentheses).
        fields = stat[stat.rindex(b")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / self.ticks
        yield GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", int(fields[20])
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            int(fields[21]) * self.page,
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.boot_time + int(fields[19]) / self.ticks,
        )
        yield CounterMetricFamily(
            "process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", cpu
        )
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", fds)
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", soft)
