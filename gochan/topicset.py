"""A set of topic names that costs what a dict's keys cost.

A Python ``set`` grown one ``add`` at a time quadruples its table until it
holds 50,000 names, and keeps it at most 60% full: at 20,000 names it takes
105 B per name, and 62 B on average between 1,000 and 10,000 names. A dict
keeps its entries in a compact array beside a small index: 21 B at 20,000
names, 27 B on average between 1,000 and 10,000 (48 against 32 B between
10,000 and 100,000; past 50,000 the set only doubles). With a topic per user,
the streamer and its driver each keep such a set of every topic held, so
the difference is paid for every connection
(bench/profiles/connection_memory.md)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["TopicSet"]


class TopicSet(dict[str, None]):
    """The topics in it are its keys; the set methods that the streamer and
    the drivers use are the dict's own C methods where one fits."""

    __slots__ = ()

    def __init__(self, topics: Iterable[str] = ()) -> None:
        super().__init__(dict.fromkeys(topics))

    # setdefault(topic) stores None under a new topic and leaves one in it.
    add = dict.setdefault

    def discard(self, topic: str) -> None:
        self.pop(topic, None)

    def issuperset(self, topics: Iterable[str]) -> bool:
        return all(map(self.__contains__, topics))

    def __repr__(self) -> str:
        return f"TopicSet({list(self)!r})"
