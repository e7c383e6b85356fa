"""Host-memory tier: chunks in one pre-allocated SlabPool, LRU, pinned while read or written.

Pins count per key. A chunk deleted under a reader is doomed: invisible at once, freed when its
key's last pin goes. Saving the key again meanwhile makes a new entry; the doomed one's extent
waits in `_retired` until the key's last pin (of either) goes, so no reader ever sees its bytes
change.

User pins (`hold`) keep a chunk from eviction and from expiry, within a bound on the tier and
a share of each key namespace's quota (so a namespace's quota always leaves room to save);
a chunk saved with a TTL
(`commit(expires_ns=...)`) past its time is a miss, reclaimed when next asked for or when room
is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtier.expiry import Expiries, now_ns
from kvtier.keys import Key
from kvtier.policy import LRUPolicy
from kvtier.pool import Extent, SlabPool, aligned
from kvtier.quota import NO_QUOTA, Ledger, Usage
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

    def __init__(
        self,
        capacity_bytes: int,
        prefault: bool = True,
        shm_dir: Path | None = None,
        quota: Ledger = NO_QUOTA,
    ) -> None:
        """`quota`: bytes per key namespace (the server's tenants), see `quota.py`."""
        self._pool = SlabPool(capacity_bytes, prefault=prefault, shm_dir=shm_dir)
        self.shared = self._pool.shared  # the file same-host clients map (shm_dir), or None
        self.max_chunk_bytes = self._pool.capacity_bytes
        self._lock = threading.Lock()
        self._entries: dict[Key, _Entry] = {}
        self._retired: dict[Key, list[Extent]] = {}  # doomed extents of re-saved keys, pinned
        self._lru = LRUPolicy()
        self._quota = quota
        self._ttl = Expiries()
        self._count = Counters()
        self._closed = False

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        with self._lock:
            n, now = 0, now_ns()
            for key in keys:
                if not self._live(key, self._entries.get(key), now):
                    break
                n += 1
            return n

    def get_into(self, key: Key, dst: Views) -> bool:
        view = self.acquire(key)
        if view is None:
            return False
        try:
            if view.nbytes != total_bytes(dst):  # stored at another size: it cannot serve
                return False
            copy_views([view], dst)
        finally:
            self.release(key)
        return True

    def put(self, key: Key, src: Views) -> bool:
        slot = self.reserve(key, total_bytes(src))
        if slot is None:
            return key in self
        copy_views(src, [slot])
        self.commit(key)
        return True

    def touch(self, keys: Sequence[Key]) -> None:
        with self._lock:
            self._lru.touch(keys)
            self._quota.touch(keys)

    def stats(self) -> TierStats:
        with self._lock:
            return self._count.snapshot(
                self.name,
                self._pool.capacity_bytes,
                self._pool.used_bytes,
                len(self._entries),
                self._lru.held_bytes,
                self._lru.held_count,
            )

    def usage(self) -> dict[str, Usage]:
        """Bytes and chunks per key namespace (empty without a quota ledger)."""
        with self._lock:
            return self._quota.usage()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._entries.clear()
            self._retired.clear()
            self._pool.close()

    # -- zero-copy access for the Store ---------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._pool.capacity_bytes

    def __contains__(self, key: object) -> bool:
        """Whether the tier holds (or is being given) this chunk; a deleted one is not held."""
        with self._lock:
            entry = self._entries.get(key)  # type: ignore[call-overload]
            if entry is None or entry.doomed:
                return False
            return not entry.ready or self._live(key, entry, now_ns())  # type: ignore[arg-type]

    def reserve(self, key: Key, nbytes: int) -> memoryview | None:
        """A pinned, writable slot for a new chunk; None if the key exists or nothing can be
        evicted (every chunk pinned). Call `commit` or `abort` after filling it."""
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.ready and not old.doomed:
                self._live(key, old, now_ns())  # reclaimed if past its TTL
                old = self._entries.get(key)
            if self._closed or (old is not None and not old.doomed):
                return None
            if nbytes > self._pool.capacity_bytes:
                return None
            extent = self._alloc(key, nbytes)
            if extent is None:
                return None
            if old is not None:  # deleted, still pinned by a reader: keep its bytes for it
                self._retired.setdefault(key, []).append(old.extent)
                self._lru.remove(key)
                self._quota.remove(key)
            self._entries[key] = _Entry(extent, nbytes)
            self._lru.add(key)
            self._quota.add(key, extent.nbytes)
            self._lru.pin(key)
            return self._pool.slot(extent)[:nbytes]

    def commit(self, key: Key, keep_pin: bool = False, expires_ns: int = 0) -> None:
        """Publish a reserved slot; with `keep_pin` the caller keeps its pin (release later).
        `expires_ns`: when the chunk expires (wall clock, `kvtier.expiry`); 0 never."""
        with self._lock:
            self._entries[key].ready = True
            self._ttl.set(key, expires_ns)
            if not keep_pin:
                self._unpin(key)

    def abort(self, key: Key) -> None:
        with self._lock:
            self._entries[key].doomed = True
            self._unpin(key)

    def acquire(self, key: Key, count: bool = True, count_misses: bool = True) -> memoryview | None:
        """A pinned read-only view of a ready chunk (release it after use), or None. `count`
        counts the hit or miss; `count_misses=False` leaves a miss to a later attempt."""
        with self._lock:
            entry = self._entries.get(key)
            if not self._live(key, entry, now_ns()):
                self._count.misses += count and count_misses
                return None
            assert entry is not None
            self._count.hits += count
            self._lru.pin(key)
            return self._pool.slot(entry.extent)[: entry.nbytes]

    def offset_of(self, view: memoryview) -> int:
        """The offset in the pool (and in the `shared` file) of a view from `acquire`."""
        return self._pool.offset_of(view)

    def release(self, key: Key) -> None:
        with self._lock:
            if not self._closed:  # after close() there is nothing left to unpin
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

    def hold(
        self, keys: Sequence[Key], max_bytes: int, quota_fraction: float = 1.0
    ) -> list[Key] | None:
        """Pin (for a user) the chunks of `keys` held here against eviction and expiry, if the
        pinned bytes stay within `max_bytes`, and each key namespace's within `quota_fraction`
        of its quota; the keys newly pinned, or None (none pinned)."""
        with self._lock:
            sizes = {}
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.ready and not entry.doomed:
                    sizes[key] = entry.extent.nbytes
            if not self._quota.may_hold(sizes, quota_fraction):
                return None
            held = self._lru.hold(sizes, max_bytes)
            self._quota.hold(held or ())
            return held

    def unhold(self, keys: Sequence[Key]) -> int:
        """Make user-pinned chunks evictable again (reclaiming those past their TTL); how
        many were pinned."""
        with self._lock:
            freed = self._lru.unhold(keys)
            self._quota.unhold(freed)
            now = now_ns()
            for key in freed:
                self._live(key, self._entries.get(key), now)
            return len(freed)

    def within_reach(self, key: Key, nbytes: int) -> bool:
        """Whether a new chunk of `nbytes` could get a slot once the chunks being read or
        written are let go: user-pinned chunks leave room for it, in the pool and under its
        namespace's quota (False: waiting would not help)."""
        size = aligned(nbytes)
        with self._lock:
            room = self._pool.capacity_bytes - self._lru.held_bytes
            return size <= room and self._quota.within_reach(key, size)

    def expires_ns(self, key: Key) -> int:
        with self._lock:
            return self._ttl.get(key)

    def check_integrity(self) -> None:
        with self._lock:
            self._pool.check_integrity()
            assert len(self._lru) == len(self._entries)
            assert all(self._lru.pinned(key) for key in self._retired)
            used = sum(e.extent.nbytes for e in self._entries.values())
            used += sum(x.nbytes for extents in self._retired.values() for x in extents)
            assert used == self._pool.used_bytes, (used, self._pool.used_bytes)
            assert used <= self._pool.capacity_bytes
            self._quota.check({k: e.extent.nbytes for k, e in self._entries.items()})

    def wait_prefaulted(self) -> None:
        self._pool.wait_prefaulted()

    # -- internals (lock held) -------------------------------------------------------------

    def _live(self, key: Key, entry: _Entry | None, now: int) -> bool:
        """Whether `entry` serves `key`: ready, not deleted, not past its TTL unless held. One
        past its TTL is reclaimed here (freed now, or when its last reader lets go)."""
        if entry is None or not entry.ready or entry.doomed:
            return False
        if self._ttl.expired(key, now) and not self._lru.held(key):
            self._expire(key, entry)
            return False
        return True

    def _expire(self, key: Key, entry: _Entry) -> None:
        entry.doomed = True
        self._count.expired += 1
        if not self._lru.pinned(key):
            self._drop(key)

    def _reclaim_due(self) -> int:
        """Reclaim every chunk past its TTL (held ones stay); how many."""
        n = 0
        for key in self._ttl.due(now_ns()):
            entry = self._entries.get(key)
            if entry is not None and not entry.doomed and not self._lru.held(key):
                self._expire(key, entry)
                n += 1
        return n

    def _unpin(self, key: Key) -> None:
        if self._lru.unpin(key):
            return
        for extent in self._retired.pop(key, ()):
            self._pool.free(extent)
        if self._entries[key].doomed:
            self._drop(key)

    def _alloc(self, key: Key, nbytes: int) -> Extent | None:
        """Room for a new chunk: where some is needed, chunks past their TTL go first, then
        its namespace's own chunks if it is at its quota, then the least recently used."""
        swept = False  # expired chunks go before any live one is evicted
        if not self._quota.make_room(key, aligned(nbytes), lambda _: True, self._evict):
            swept = True  # over its quota (asked with every chunk busy: nothing evicted)
            self._reclaim_due()
        if not self._quota.make_room(key, aligned(nbytes), self._busy, self._evict):
            return None
        while (extent := self._pool.alloc(nbytes)) is None:
            if not swept:
                swept = True
                if self._reclaim_due():
                    continue
            victim = self._lru.victim()
            if victim is None:
                return None
            self._evict(victim)
        return extent

    def _busy(self, key: Key) -> bool:
        """Not a victim for the quota: being read, or pinned by a user."""
        return self._lru.pinned(key) or self._lru.held(key)

    def _evict(self, key: Key) -> None:
        self._drop(key)
        self._count.evictions += 1

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._lru.remove(key)
        self._quota.remove(key)
        self._ttl.discard(key)
        self._pool.free(entry.extent)
