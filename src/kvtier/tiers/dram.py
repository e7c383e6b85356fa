"""Host-memory tier: chunks in one pre-allocated SlabPool, LRU, pinned while read or written."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.keys import Key
from kvtier.policy import LRUPolicy
from kvtier.pool import Extent, SlabPool
from kvtier.tiers.base import Counters, TierStats, Views, copy_views, total_bytes


@dataclass(slots=True)
class _Entry:
    extent: Extent
    nbytes: int
    ready: bool = False
    doomed: bool = False


class DramTier:
    """Bounded by `capacity_bytes`: the pool is the only memory chunks ever occupy."""

    name = "dram"

    def __init__(self, capacity_bytes: int, prefault: bool = True) -> None:
        self._pool = SlabPool(capacity_bytes, prefault=prefault)
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}
        self._lru = LRUPolicy()
        self._count = Counters()

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        with self._lock:
            n = 0
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or not entry.ready or entry.doomed:
                    break
                n += 1
            return n

    def get_into(self, key: Key, dst: Views) -> bool:
        view = self.acquire(key)
        if view is None:
            return False
        try:
            copy_views([view], dst)
        finally:
            self.release(key)
        return True

    def put(self, key: Key, src: Views) -> bool:
        slot = self.reserve(key, total_bytes(src))
        if slot is None:
            return key in self._entries
        copy_views(src, [slot])
        self.commit(key)
        return True

    def touch(self, keys: Sequence[Key]) -> None:
        with self._lock:
            self._lru.touch(keys)

    def stats(self) -> TierStats:
        with self._lock:
            return self._count.snapshot(
                self.name, self._pool.capacity_bytes, self._pool.used_bytes, len(self._entries)
            )

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._pool.close()

    # -- zero-copy access for the Store ---------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._pool.capacity_bytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def reserve(self, key: Key, nbytes: int) -> memoryview | None:
        """A pinned, writable slot for a new chunk; None if the key exists or nothing can be
        evicted (every chunk pinned). Call `commit` or `abort` after filling it."""
        with self._lock:
            if key in self._entries or nbytes > self._pool.capacity_bytes:
                return None
            extent = self._alloc(nbytes)
            if extent is None:
                return None
            self._entries[key] = _Entry(extent, nbytes)
            self._lru.add(key)
            self._lru.pin(key)
            return self._pool.slot(extent)[:nbytes]

    def commit(self, key: Key, keep_pin: bool = False) -> None:
        """Publish a reserved slot; with `keep_pin` the caller keeps its pin (release later)."""
        with self._lock:
            self._entries[key].ready = True
            if not keep_pin:
                self._unpin(key)

    def abort(self, key: Key) -> None:
        with self._lock:
            self._entries[key].doomed = True
            self._unpin(key)

    def acquire(self, key: Key, count: bool = True) -> memoryview | None:
        """A pinned read-only view of a ready chunk (release it after use), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or not entry.ready or entry.doomed:
                self._count.misses += count
                return None
            self._count.hits += count
            self._lru.pin(key)
            return self._pool.slot(entry.extent)[: entry.nbytes]

    def release(self, key: Key) -> None:
        with self._lock:
            self._unpin(key)

    def delete(self, key: Key) -> bool:
        """Forget a chunk (freed now, or when its last reader releases it)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.doomed:
                return False
            entry.doomed = True
            if not self._lru.pinned(key):
                self._drop(key)
            return True

    def check_integrity(self) -> None:
        with self._lock:
            self._pool.check_integrity()
            assert len(self._lru) == len(self._entries)
            used = sum(e.extent.nbytes for e in self._entries.values())
            assert used == self._pool.used_bytes, (used, self._pool.used_bytes)
            assert used <= self._pool.capacity_bytes

    def wait_prefaulted(self) -> None:
        self._pool.wait_prefaulted()

    # -- internals (lock held) -------------------------------------------------------------

    def _unpin(self, key: Key) -> None:
        if self._lru.unpin(key) == 0 and self._entries[key].doomed:
            self._drop(key)

    def _alloc(self, nbytes: int) -> Extent | None:
        while (extent := self._pool.alloc(nbytes)) is None:
            victim = self._lru.victim()
            if victim is None:
                return None
            self._drop(victim)
            self._count.evictions += 1
        return extent

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._lru.remove(key)
        self._pool.free(entry.extent)
