"""Group a py-spy raw profile of the gochan server into the rows of notifications.md.

Reads ``py-spy record --format raw`` output (one ``frame;frame;... count`` line per
stack, root first), drops the samples whose leaf is ``epoll_pwait`` (the server
waiting), and attributes every other sample to the first group in GROUPS that
matches its stack, looking from the leaf towards the root (so a group includes the
C and library code its functions call). Prints a Markdown table with each group's
share and, given the clean window's CPU per message, its microseconds per message.

Usage:
    python bench/profiles/pyspy_groups.py bench/out/n10k-a.pyspy.txt --us-per-msg 59.4
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

# (row, substrings of a raw frame "function (file:line)"): a stack goes to the
# first row whose pattern occurs in the deepest frame that matches any row.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    (
        "Host check (routes.py: cross_site, _local_host, ipaddress)",
        (
            "Router.cross_site (",
            "Router._cross_site (",
            "Router._local_host (",
            "Router.keyless_loopback (",
        ),
    ),
    (
        "publish authorization (routes.py: may_publish, http.py: is_loopback_host)",
        ("Router.may_publish (", "is_loopback_host ("),
    ),
    (
        "fast path: read loop and parser (protocol.py: _input, _feed_fast; publish.pyx)",
        ("HttpProtocol._input (", "HttpProtocol._feed_fast (", "PublishParser"),
    ),
    (
        "fast path: publish checks and answer body (routes.py: publish_fast, orjson)",
        ("Router.publish_fast (",),
    ),
    (
        "HTTP parse (protocol.py: data_received, _feed, on_* callbacks, llhttp)",
        ("HttpProtocol.data_received (", "HttpProtocol._feed (", "HttpProtocol.on_"),
    ),
    (
        "request loop (protocol.py: _run, _blocked, _deliver_safely)",
        ("HttpProtocol._run (", "HttpProtocol._blocked (", "HttpProtocol._deliver_safely ("),
    ),
    ("routing (routes.py: Router.dispatch)", ("Router.dispatch (",)),
    (
        "publish handler (routes.py: publish, _read_publish)",
        ("Router.publish (", "Router._read_publish"),
    ),
    ("topic check (streamer.py: check_topics)", ("Streamer.check_topics",)),
    (
        "streamer publish path (publish_nowait, _note_unheld, held, MemDriver)",
        (
            "Streamer.publish_nowait (",
            "Streamer.can_publish_nowait (",
            "Streamer._note_unheld (",
            "Streamer._check_open (",
            "(gochan/subscriptions.py",
            "MemDriver.",
        ),
    ),
    ("streamer.py: on_message", ("Streamer.on_message (",)),
    (
        "id + frame encode (replay.py: Replayer.frame, frames.pyx)",
        ("Replayer.frame (", "(gochan/_fast/frames.pyx"),
    ),
    ("history append (history.py)", ("(gochan/history.py",)),
    (
        "hub publish + dirty marking (hub.pyx: Hub.publish)",
        ("Hub_publish (", "publish (gochan/_fast/hub.pyx", "Hub__mark_dirty ("),
    ),
    ("stream flush, writev (hub.pyx: flush)", ("flush (gochan/_fast/hub.pyx",)),
    (
        "publish response build (_json, simple_response, response_head, deliver, cors)",
        (
            "_json (gochan/",
            "json_ok (",
            "simple_response (",
            "response_head (",
            "HttpProtocol.deliver (",
            "Router.cors (",
        ),
    ),
    ("publish response write (protocol.py: _flush_out)", ("HttpProtocol._flush_out (",)),
    (
        "gochan NATS driver (drivers/nats.py, drivers/_lifecycle.py)",
        ("NatsDriver", "Lifecycle._deliver ("),
    ),
    ("nats-py Client._process_msg", ("Client._process_msg (",)),
    ("nats-py Subscription._wait_for_msgs", ("Subscription._wait_for_msgs (",)),
    ("nats-py Parser.parse", ("Parser.parse (",)),
    ("nats-py Client._read_loop", ("Client._read_loop (",)),
]
OTHER = "event loop and the rest (uvloop, asyncio, reads)"


def classify(frames: list[str]) -> str:
    for frame in reversed(frames):
        for row, patterns in GROUPS:
            if any(p in frame for p in patterns):
                return row
    return OTHER


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy --format raw output")
    p.add_argument("--us-per-msg", type=float, default=0.0, help="clean window's CPU per message")
    args = p.parse_args(argv)
    counts: collections.Counter[str] = collections.Counter()
    idle = 0
    for line in args.profile.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        if re.match(r"epoll_pwait ", frames[-1]):
            idle += int(n)
            continue
        counts[classify(frames)] += int(n)
    busy = sum(counts.values())
    print(f"{busy} busy samples, {idle} idle (epoll_pwait) left out")
    print("| part | µs/msg | % of server CPU |\n|---|---:|---:|")
    for row, n in counts.most_common():
        share = n / busy if busy else 0.0
        us = f"{args.us_per_msg * share:.1f}" if args.us_per_msg else "-"
        print(f"| {row} | {us} | {100 * share:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
