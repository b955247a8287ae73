"""Draw the chart of a bench/compare.py result: a PNG next to its JSON.

Three panels from one report: deliveries/s against the offered publish rate,
p99 publish-to-receive latency against the offered rate (one line per server,
both axes logarithmic; a hollow marker is a step the server did not sustain),
and the server's RSS per idle connection (a bar per server).

bench/compare.py calls ``draw`` after writing its JSON; to redraw a chart from
an existing result without rerunning anything:

    python bench/chart.py bench/results/compare-20261202-013000.json
    python bench/chart.py result.json --out bench/compare.png

Needs matplotlib (``pip install -e '.[bench]'``); it draws headless (Agg).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Json = dict[str, Any]

GOOD_P99_MS = 100.0  # compare.py's "usable" bound (GOOD_P99_US)
SUSTAINED_P99_MS = 1000.0  # compare.py's sustained bound (SUSTAINED_P99_US)

# Fixed colours for the servers compare.py knows, so every chart reads the same;
# anything else (a server added later) takes the next colour of FALLBACK.
STYLES: dict[str, Json] = {
    "gochan": {"color": "#1f5fbf", "linestyle": "-", "marker": "o"},
    "gochan-nats": {"color": "#5aa0e6", "linestyle": "--", "marker": "s"},
    "sse-starlette": {"color": "#d9822b", "linestyle": "-", "marker": "^"},
    "aiohttp-sse": {"color": "#b23a48", "linestyle": "-", "marker": "v"},
}
REFERENCE_STYLE: Json = {"color": "#222222", "linestyle": ":", "marker": "D"}
FALLBACK = ("#6a8a3a", "#7d5ba6", "#8c6d31", "#2a9d8f")


def is_reference(name: str) -> bool:
    """A C reference server (issue 15's minimal epoll server), drawn in black."""
    return name.startswith(("c-", "c_")) or "reference" in name


def styles(names: list[str]) -> Iterator[tuple[str, Json]]:
    spare = iter(FALLBACK)
    for name in names:
        if name in STYLES:
            yield name, STYLES[name]
        elif is_reference(name):
            yield name, REFERENCE_STYLE
        else:
            yield name, {"color": next(spare, "#777777"), "linestyle": "-", "marker": "P"}


def title(report: Json) -> str:
    w = report.get("workload", {})
    m = report.get("machine", {})
    first = (
        f"{w.get('name', 'compare')}: {w.get('connections', '?'):,} connections x "
        f"{w.get('per_conn_topics', '?')} of {w.get('topics', '?'):,} topics "
        f"({w.get('subscribers_per_topic', 0):g} subscribers/topic), "
        f"{w.get('duration_s', '?'):g} s steps"
    )
    second = ", ".join(
        str(part)
        for part in (
            report.get("started_at", "").replace("T", " ").removesuffix("+00:00")
            + (" UTC" if report.get("started_at") else ""),
            f"gochan {report['commit']}" if report.get("commit") else "",
            m.get("cpu_model", ""),
            f"{m['cpus']} cores" if m.get("cpus") else "",
            f"Python {m['python']}" if m.get("python") else "",
        )
        if part
    )
    return first + ("\n" + second if second else "")


def draw(report: Json, out: Path) -> Path:
    """Write the chart of ``report`` (a compare.py JSON document) to ``out`` as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    servers: Json = report.get("servers", {})
    names = list(servers)
    if not names:
        raise ValueError("the report has no servers")
    fig, (ax_d, ax_p, ax_m) = plt.subplots(
        1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.25, 1.25, 0.8]}
    )
    si = FuncFormatter(lambda v, _: human(v))
    spt = report.get("workload", {}).get("subscribers_per_topic")
    rates: list[float] = []
    for name, style in styles(names):
        steps = sorted(servers[name].get("steps", []), key=lambda s: s["rate"])
        if not steps:
            continue
        x = [s["rate"] for s in steps]
        rates += x
        d = [s["deliveries_per_s"] for s in steps]
        p99 = [s["latency_us"]["p99"] / 1000 for s in steps]
        failed = [i for i, s in enumerate(steps) if not s["sustained"]]
        for ax, y in ((ax_d, d), (ax_p, p99)):
            ax.plot(x, y, label=name, markersize=6, linewidth=1.8, **style)
            ax.plot(  # the steps not sustained: the same marker, hollow
                [x[i] for i in failed],
                [y[i] for i in failed],
                linestyle="none",
                marker=style["marker"],
                markersize=6,
                color=style["color"],
                markerfacecolor="white",
            )
    if spt and rates:
        lo, hi = min(rates), max(rates)
        ax_d.plot(
            [lo, hi],
            [lo * spt, hi * spt],
            color="#aaaaaa",
            linewidth=1,
            linestyle="-.",
            zorder=0,
            label=f"all expected ({spt:g} x rate)",
        )
    ax_d.set(
        xscale="log",
        yscale="log",
        xlabel="offered publish rate (msgs/s)",
        ylabel="deliveries/s",
        title="deliveries/s (hollow: step not sustained)",
    )
    ax_p.axhline(GOOD_P99_MS, color="#999999", linewidth=0.8, linestyle="--")
    ax_p.axhline(SUSTAINED_P99_MS, color="#999999", linewidth=0.8, linestyle=":")
    ax_p.set(
        xscale="log",
        yscale="log",
        xlabel="offered publish rate (msgs/s)",
        ylabel="p99 latency (ms)",
        title="p99 publish-to-receive latency (100 ms, 1 s marked)",
    )
    for ax in (ax_d, ax_p):
        ax.xaxis.set_major_formatter(si)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax_d.yaxis.set_major_formatter(si)
    ax_p.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    colours = dict((n, s["color"]) for n, s in styles(names))
    kib = [servers[n].get("summary", {}).get("kib_per_conn") for n in names]
    bars = ax_m.bar(
        range(len(names)),
        [k or 0 for k in kib],
        color=[colours[n] for n in names],
    )
    for bar, k in zip(bars, kib, strict=True):
        ax_m.annotate(
            "n/a" if k is None else f"{k:.1f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax_m.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=9)
    ax_m.set(ylabel="KiB", title="server RSS per idle connection")
    ax_m.margins(y=0.12)
    ax_m.grid(True, axis="y", alpha=0.3)

    fig.suptitle(title(report), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)
    return out


def human(v: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json", type=Path, help="a bench/compare.py result")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    args = p.parse_args(argv)
    try:
        report = json.loads(args.json.read_text())
    except (OSError, ValueError) as exc:
        p.error(f"cannot read {args.json}: {exc}")
    if not isinstance(report, dict) or not isinstance(report.get("servers"), dict):
        p.error(f"{args.json} is not a bench/compare.py result (no 'servers' object)")
    try:
        out = draw(report, args.out or args.json.with_suffix(".png"))
    except (KeyError, TypeError, ValueError) as exc:
        p.error(f"{args.json}: cannot draw it: {exc!r}")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
