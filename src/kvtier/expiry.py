"""Expiry times of chunks saved with a TTL (`Store.bind(..., ttl_s=...)`).

Times are wall-clock nanoseconds since the epoch (`time.time_ns()`), so they mean the same after
a restart; 0 means "never". A tier keeps one `Expiries` beside its index: a look-up asks
`expired(key)`, and `due()` hands out, oldest first, the chunks whose time has come (a heap, so
a sweep costs O(log n) per expired chunk, nothing for the rest). Entries of keys discarded or
given a new time stay in the heap until it is rebuilt from the live ones, once it holds more
than twice as many as there are live keys (plus `HEAP_SLACK`).
"""

from __future__ import annotations

import heapq
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from kvtier.journal import Journal
from kvtier.keys import Key

RECORD = struct.Struct("<16sQ")  # an expiry journal record: key, expiry (unix ns)
COMPACT_SLACK = 65536  # records beyond 4x the live ones before the journal is compacted
HEAP_SLACK = 1024  # heap entries beyond 2x the live keys before the heap is rebuilt


def now_ns() -> int:
    return time.time_ns()


def expiry_ns(ttl_s: float | None) -> int:
    """When a chunk saved now with `ttl_s` expires; 0 (never) without a TTL."""
    return 0 if ttl_s is None else now_ns() + max(1, int(ttl_s * 1e9))


class Expiries:
    """Key -> expiry time for the chunks that have one; the owner holds its lock."""

    def __init__(self) -> None:
        self._at: dict[Key, int] = {}
        self._heap: list[tuple[int, Key]] = []

    def __len__(self) -> int:
        return len(self._at)

    def set(self, key: Key, at_ns: int) -> None:
        """Give `key` an expiry time (0: none)."""
        if not at_ns:
            self._at.pop(key, None)
            return
        if self._at.get(key) == at_ns:
            return
        self._at[key] = at_ns
        heapq.heappush(self._heap, (at_ns, key))
        if len(self._heap) > 2 * len(self._at) + HEAP_SLACK:
            self._compact()

    def get(self, key: Key) -> int:
        return self._at.get(key, 0)

    def discard(self, key: Key) -> None:
        self._at.pop(key, None)

    def expired(self, key: Key, now: int) -> bool:
        at = self._at.get(key)
        return at is not None and at <= now

    def due(self, now: int) -> list[Key]:
        """The keys whose time has come, each once (they stay known to `expired` until
        `discard`ed: the owner may keep some, e.g. pinned ones)."""
        heap, found = self._heap, []
        while heap and heap[0][0] <= now:
            at, key = heapq.heappop(heap)
            if self._at.get(key) == at:
                found.append(key)
        return found

    def items(self) -> list[tuple[Key, int]]:
        return list(self._at.items())

    def _compact(self) -> None:
        """Rebuild the heap from its live entries (those not handed out by `due` yet)."""
        live = {(at, key) for at, key in self._heap if self._at.get(key) == at}
        self._heap = list(live)
        heapq.heapify(self._heap)


class ExpiryLog:
    """A disk tier's expiry journal: one record per chunk saved with a TTL, appended before
    the chunk is published (not fsynced: chunk files are not either). The chunk's header stays
    the truth; the journal only says which chunks to ask after a restart. The owner serialises
    appends with compactions (`rewrite`), so that a compaction loses no record."""

    def __init__(self, path: Path) -> None:
        self._journal = Journal(path, sync=False)
        self._appends = 0

    def recorded(self) -> dict[Key, int]:
        """Key -> expiry as journaled when opened (the last record of a key wins)."""
        found: dict[Key, int] = {}
        for record in self._journal.records:
            if len(record) == RECORD.size:
                key, at = RECORD.unpack(record)
                found[key] = at
        return found

    def append(self, key: Key, at_ns: int) -> None:
        """Journal one chunk's expiry; OSError if the journal cannot take it (then it holds
        what it held before)."""
        self._journal.append(RECORD.pack(key, at_ns))
        self._appends += 1

    def compaction_due(self, live: int) -> bool:
        """Whether the journal has grown well past the `live` expiries it is for."""
        return self._appends > 4 * live + COMPACT_SLACK

    def rewrite(self, items: Iterable[tuple[Key, int]]) -> None:
        """Replace the records with `items`, atomically; OSError (the old records stay) if
        that fails."""
        self._journal.rewrite(RECORD.pack(key, at) for key, at in items)
        self._appends = 0

    def close(self) -> None:
        self._journal.close()
