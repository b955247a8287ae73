"""One asyncio lock per key (a topic, a client), made when it is first
wanted and dropped once nobody holds it or waits for it.

Dropping a lock as soon as it is not ``locked()`` is wrong: when its holder
releases it, the first waiter is only woken, and until that waiter runs the
lock reads as free. A caller that came in between would find no lock, make
a new one and run beside the woken waiter. Here a lock is dropped when the
count of its holder and waiters falls to zero.

Most holds find nobody else on their key (a new client's first
subscription, one topic's subscribe). Those take no ``asyncio.Lock`` at
all: the entry alone says the key is held, and the lock is made by the
first caller that has to wait."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["KeyedLocks"]

K = TypeVar("K", bound=Hashable)


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock: asyncio.Lock | None = None  # made when someone must wait
        self.users = 1  # the holder and every waiter


class KeyedLocks(Generic[K]):
    """``async with locks.hold(key):`` runs one body at a time per key."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[K, _Entry] = {}

    def busy(self, key: K) -> bool:
        """Someone holds the lock of ``key`` or waits for it."""
        return key in self._entries

    def __len__(self) -> int:
        """Keys whose lock is held or waited for."""
        return len(self._entries)

    def hold(self, key: K) -> _Holding[K]:
        return _Holding(self, key)


class _Holding(Generic[K]):
    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: KeyedLocks[K], key: K) -> None:
        self._locks = locks
        self._key = key

    async def __aenter__(self) -> None:
        entries = self._locks._entries
        entry = entries.get(self._key)
        if entry is None:  # nobody on this key: it is ours, with no lock
            self._entry = entries[self._key] = _Entry()
            return
        self._entry = entry
        entry.users += 1
        lock = entry.lock
        if lock is None:
            lock = entry.lock = asyncio.Lock()
            # Taken for the holder, who releases it on leaving: a free lock
            # with no waiters is taken without suspending.
            await lock.acquire()
        try:
            await lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lock = self._entry.lock
        if lock is not None:
            lock.release()  # to the first waiter
        self._leave()

    def _leave(self) -> None:
        entry = self._entry
        entry.users -= 1
        if not entry.users:  # only the entry in use is ever in the dict
            del self._locks._entries[self._key]
