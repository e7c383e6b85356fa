"""Taking a new chunk: a slot for it, then its writes to the lower tiers in the background.

A save is copied into a DRAM slot, or, without a DRAM tier, into a slot of the store's
staging pool; while every slot is pinned by writes still in flight, it waits for one (a save
that user pins leave no room for, in DRAM or under its namespace's quota, is dropped at once,
counted). The
filled slot is published (a DRAM chunk, pinned until its writes have landed) and written
through to the lower tiers by the store's I/O workers: to disk only once the chunk is
admitted (admission.py), to the other lower tiers always. A store whose one tier is a
same-host server that takes writes into its shared DRAM file writes there at once, in the
caller's thread. `delete_chunk` and `pin_keys` wait for a key's writes in flight
(`_writing`), so a deleted chunk never reappears and a pinned one is held where it lands.

`WriteBehind` is a part of `Store` (its base class); it uses the store's tiers, lock and
workers, declared below.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.admission import DiskAdmission
from kvtier.jobs import Jobs
from kvtier.keys import Key
from kvtier.pool import StagingPool
from kvtier.tiers.base import Tier, Views, copy_views, total_bytes
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier


class WriteBehind:
    """The write half of `Store`."""

    _dram: DramTier | None
    _lower: tuple[Tier, ...]
    _off_disk: tuple[Tier, ...]
    _admission: DiskAdmission
    _staging: StagingPool | None
    _cond: threading.Condition
    _jobs: Jobs
    _writing: dict[Key, int]
    _dropped: int
    _disk_written: int

    if TYPE_CHECKING:

        def _holds(self, key: Key) -> bool: ...
        def _in_place_tier(self) -> Any | None: ...
        def _hold_if_pinned(self, tier: Tier, key: Key) -> None: ...

    def _write_chunk(self, key: Key, src: Views, expires_ns: int = 0) -> bool:
        """Whether the chunk was taken (False: already held, or no room for it)."""
        if self._holds(key):
            return False
        if self._dram is None and (tier := self._in_place_tier()) is not None:
            return bool(tier.put(key, src))  # a memcpy into the server's shared DRAM
        slot, release = self._claim(key, total_bytes(src))
        if slot is None or release is None:
            with self._cond:
                self._dropped += 1
            return False
        copy_views(src, [slot])
        self._publish(key, slot, release, expires_ns)
        return True

    def _publish(
        self, key: Key, slot: memoryview, release: Callable[[], None], expires_ns: int = 0
    ) -> None:
        """A filled slot becomes the chunk; its lower-tier writes start in the background
        (to disk only if admitted)."""
        tiers = self._lower if self._admission.on_save(key) else self._off_disk
        if self._dram is not None:
            self._dram.commit(key, keep_pin=bool(tiers), expires_ns=expires_ns)
            self._hold_if_pinned(self._dram, key)
        if tiers:
            self._write_behind(key, slot, release, tiers, expires_ns)
        elif self._dram is None:
            release()  # a staging slot that no tier reads: the chunk was not admitted

    def _claim(self, key: Key, nbytes: int) -> tuple[memoryview | None, Callable[[], None] | None]:
        """A slot for a new chunk (DRAM, else staging), waiting while in-flight writes pin all
        memory; (None, None) if the chunk cannot be held, at once when user pins leave it no
        room (in DRAM or under its namespace's quota: waiting for writes would not help)."""
        pool_wait = 0.05
        while True:
            if self._dram is not None:
                slot = self._dram.reserve(key, nbytes)
                if slot is not None:
                    return slot, functools.partial(self._dram.release, key)
                if key in self._dram or not self._dram.within_reach(key, nbytes):
                    return None, None
            elif self._staging is not None:
                slot, release = self._stage(nbytes)
                if slot is not None:
                    return slot, release
            else:
                return None, None
            with self._cond:
                if self._jobs.pending == 0:
                    return None, None
                self._cond.wait(pool_wait)

    def _stage(self, nbytes: int) -> tuple[memoryview | None, Callable[[], None] | None]:
        staging = self._staging
        assert staging is not None
        with self._cond:
            staged = staging.alloc(nbytes)
        if staged is None:
            return None, None

        def release() -> None:
            with self._cond:
                staged.pool.free(staged.extent)

        return staged.pool.slot(staged.extent)[:nbytes], release

    def _write_behind(
        self,
        key: Key,
        slot: memoryview,
        release: Callable[[], None],
        tiers: Sequence[Tier],
        expires_ns: int = 0,
    ) -> None:
        """Write a pinned slot to `tiers` in the background, then unpin it; `delete_chunk`
        waits for a key's pending writes so a deleted chunk never reappears."""
        with self._cond:
            self._writing[key] = self._writing.get(key, 0) + 1

        def done() -> None:
            release()
            with self._cond:
                left = self._writing.pop(key) - 1
                if left:
                    self._writing[key] = left
                self._cond.notify_all()

        def write() -> None:
            try:
                for tier in tiers:
                    if isinstance(tier, DiskTier):
                        if tier.put(key, [slot], expires_ns):
                            self._hold_if_pinned(tier, key)  # pinned chunks are held wherever
                            with self._cond:
                                self._disk_written += slot.nbytes
                    else:
                        tier.put(key, [slot])
            finally:
                done()

        self._jobs.submit(write, cleanup=done)
