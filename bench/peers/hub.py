"""In-memory topic fan-out shared by the peer apps.

What a competent user of asyncio writes: a dict of topic -> set of per-connection
``asyncio.Queue``; publishing puts one item on every subscriber's queue. Queues are
bounded so one stuck client cannot grow memory without limit; a full queue drops
the message for that client (counted), as a careful user would.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Iterable

QUEUE_SIZE = 1024
DEFAULT_HEARTBEAT_S = 15.0

Item = tuple[str, int, str]


class Hub:
    def __init__(self) -> None:
        self.topics: dict[str, set[asyncio.Queue[Item]]] = {}
        self.dropped = 0
        self._ids = itertools.count(1)

    def subscribe(self, topics: Iterable[str]) -> asyncio.Queue[Item]:
        queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=QUEUE_SIZE)
        for topic in topics:
            self.topics.setdefault(topic, set()).add(queue)
        return queue

    def unsubscribe(self, topics: Iterable[str], queue: asyncio.Queue[Item]) -> None:
        for topic in topics:
            subscribers = self.topics.get(topic)
            if subscribers is None:
                continue
            subscribers.discard(queue)
            if not subscribers:
                del self.topics[topic]

    def publish(self, topic: str, data: str) -> int:
        event_id = next(self._ids)
        item = (topic, event_id, data)
        for queue in self.topics.get(topic, ()):
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                self.dropped += 1
        return event_id


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S)
    return parser.parse_args()
