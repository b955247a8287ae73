"""The counters one HTTP front end keeps (the raw server, or the ASGI
adapter: each its own), and the Prometheus text they make with the
streamer's figures."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..streamer import Streamer

__all__ = ["Metrics"]


class Metrics:
    """Connections and refusals counted by one front end; ``render`` is the
    text of ``GET /metrics``."""

    __slots__ = (
        "bad_requests",
        "connections",
        "connections_refused",
        "connections_total",
        "peer_refusals",
        "refusals",
        "streamer",
    )

    def __init__(self, streamer: Streamer) -> None:
        self.streamer = streamer
        self.connections = 0  # open TCP connections (requests, behind ASGI), streams included
        self.connections_total = 0
        self.connections_refused = 0
        self.peer_refusals = 0
        self.bad_requests = 0
        self.refusals: Counter[str] = Counter()  # requests refused, by reason

    def refuse(self, reason: str) -> None:
        """Count one request or connection refused for ``reason``: a short
        fixed word such as ``"max_connections"`` or ``"forbidden"``, never
        anything the client sent (it becomes a label value)."""
        self.refusals[reason] += 1

    def render(self) -> str:
        stats = self.streamer.stats()
        driver = stats.pop("driver", {}) or {}
        rows = [
            ("gochan_connections", "gauge", "Open TCP connections", self.connections),
            ("gochan_streams", "gauge", "Open event streams", stats.get("connections", 0)),
            ("gochan_clients", "gauge", "Known clients", stats["clients"]),
            ("gochan_topics", "gauge", "Topics with a local stream", stats.get("topics", 0)),
            ("gochan_driver_subscriptions", "gauge", "Broker subscriptions held",
             stats["driver_subscriptions"]),
            ("gochan_connections_total", "counter", "Connections accepted or refused",
             self.connections_total),
            ("gochan_connections_refused_total", "counter", "Connections refused (limit)",
             self.connections_refused),
            ("gochan_peer_connections_refused_total", "counter",
             "Connections refused for one address's share (max_connections_per_peer)",
             self.peer_refusals),
            ("gochan_bad_requests_total", "counter", "Requests refused as malformed",
             self.bad_requests),
            ("gochan_messages_published_total", "counter", "Messages published via gochan",
             stats["published"]),
            ("gochan_messages_in_total", "counter", "Messages received from the driver",
             stats["messages_in"]),
            ("gochan_deliveries_total", "counter", "Frames queued to streams",
             stats.get("deliveries", 0)),
            ("gochan_writes_total", "counter", "Socket writes", stats.get("writes", 0)),
            ("gochan_bytes_out_total", "counter", "Bytes written to streams",
             stats.get("bytes_written", 0)),
            ("gochan_slow_consumer_disconnects_total", "counter",
             "Streams dropped for unsent output over the bound", stats.get("slow_disconnects", 0)),
            ("gochan_subscription_failures_total", "counter", "Broker subscription failures",
             stats["subscription_failures"]),
            ("gochan_clients_expired_total", "counter", "Clients removed by TTL",
             stats["clients_expired"]),
            ("gochan_replay_hits_total", "counter", "Reconnects fully replayed",
             stats["replay_hits"]),
            ("gochan_replay_misses_total", "counter", "Reconnects that could not be replayed",
             stats["replay_misses"]),
            ("gochan_broker_reconnects_total", "counter", "Broker reconnections",
             int(driver.get("reconnects", 0))),
            ("gochan_history_messages", "gauge", "Messages kept for replay",
             stats["history_messages"]),
            ("gochan_history_bytes", "gauge", "Bytes of frames kept for replay",
             stats["history_bytes"]),
        ]  # fmt: skip
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP gochan_refusals_total Requests and connections refused, by reason",
                  "# TYPE gochan_refusals_total counter"]  # fmt: skip
        lines += [
            f'gochan_refusals_total{{reason="{r}"}} {n}' for r, n in sorted(self.refusals.items())
        ]
        lines.append("# TYPE gochan_driver_ready gauge")
        lines.append(f"gochan_driver_ready {int(self.streamer.ready)}")
        return "\n".join(lines) + "\n"
