"""Serving DRAM misses from the lower tiers, and promoting what they serve into DRAM.

A chunk DRAM does not hold is read from the first lower tier that serves it (disk, then
remote) into a new DRAM slot, so its next use is a DRAM hit; it keeps its expiry and, while
pinned, is held in DRAM too. A chunk promoted from the remote tier is written down to the
local tiers that lack it (to disk only if admitted). Without a DRAM tier, or without room in
it, the chunk is read straight into the caller's buffer. Many misses are read in parallel by
the store's readers (one reader's checksum overlaps another's I/O); prefetch promotes a run
of leading chunks in the background. A DRAM hit counts as a use for disk admission
(admission.py): the hit that admits a chunk writes its DRAM copy to disk.

`Promotion` is a part of `Store` (its base class); it uses the store's tiers, readers and
background writes, declared below.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from kvtier.admission import DiskAdmission
from kvtier.chunkstore import Located
from kvtier.keys import Key
from kvtier.tiers.base import Tier, Views, copy_views, total_bytes
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier


class Acquired(NamedTuple):
    """A pinned DRAM view of a chunk and the tier that served it."""

    view: memoryview
    tier: str


class Promotion:
    """The read half of `Store`."""

    _dram: DramTier | None
    _disk: DiskTier | None
    _lower: tuple[Tier, ...]
    _off_disk: tuple[Tier, ...]
    _admission: DiskAdmission
    _readers: ThreadPoolExecutor

    if TYPE_CHECKING:

        def _locate(self, keys: Sequence[Key], served_from: bool = False) -> Located: ...
        def _hold_if_pinned(self, tier: Tier, key: Key) -> None: ...
        def _write_behind(
            self,
            key: Key,
            slot: memoryview,
            release: Callable[[], None],
            tiers: Sequence[Tier],
            expires_ns: int = 0,
        ) -> None: ...

    def _read_chunks(self, keys: Sequence[Key], dsts: Sequence[Views]) -> list[str | None]:
        dram = self._dram
        served: list[str | None] = [None] * len(keys)
        rest = []
        for i, (key, dst) in enumerate(zip(keys, dsts, strict=True)):
            if dram is not None and dram.get_into(key, dst):
                served[i] = dram.name
                self._dram_hit(key)
            else:
                rest.append(i)
        if len(rest) == 1:
            served[rest[0]] = self._read_lower(keys[rest[0]], dsts[rest[0]])
        elif rest:
            reads = self._readers.map(lambda i: self._read_lower(keys[i], dsts[i]), rest)
            for i, tier in zip(rest, reads, strict=True):
                served[i] = tier
        return served

    def _from_lower(self, key: Key, nbytes: int) -> Acquired | None:
        """Promote a chunk from the first lower tier that serves it; pinned in DRAM."""
        for tier in self._lower:
            view = self._promote(tier, key, nbytes)
            if view is not None:
                return Acquired(view, tier.name)
        return None

    def _read_lower(self, key: Key, dst: Views, promote: bool = True) -> str | None:
        """Serve a DRAM miss from the lower tiers: through DRAM (promoting), or straight
        into `dst` when there is no DRAM tier, no room in it, or `promote` is False."""
        if self._dram is not None and promote:
            got = self._from_lower(key, total_bytes(dst))
            if got is not None:
                try:
                    copy_views([got.view], dst)
                finally:
                    self._dram.release(key)
                return got.tier
        for tier in self._lower:
            if tier.get_into(key, dst):
                return tier.name
        return None

    def _promote(self, tier: Tier, key: Key, nbytes: int) -> memoryview | None:
        """Read a chunk from `tier` into a new DRAM slot; returns it pinned, or None."""
        dram = self._dram
        assert dram is not None
        if isinstance(tier, DiskTier) and not tier.contains_prefix([key]):
            return None  # don't evict for a chunk that isn't there (remote: costs a round trip)
        slot = dram.reserve(key, nbytes)
        if slot is None:
            return None
        if not tier.get_into(key, [slot]):
            dram.abort(key)
            return None
        expires = tier.expires_ns(key) if isinstance(tier, DiskTier) else 0
        dram.commit(key, keep_pin=True, expires_ns=expires)
        self._hold_if_pinned(dram, key)
        if isinstance(tier, DiskTier):
            return slot  # already on the lowest local tier; nothing to write back
        lower = self._lower if self._admission.on_save(key) else self._off_disk
        below = [t for t in lower if t is not tier and not t.contains_prefix([key])]
        if below and dram.acquire(key, count=False) is not None:
            release = functools.partial(dram.release, key)
            self._write_behind(key, slot, release, below)
        return slot

    def _prefetch(self, keys: list[Key], nbytes: int) -> None:
        dram = self._dram
        assert dram is not None
        located = self._locate(keys)  # one batched question per tier; only present chunks move
        by_name = {tier.name: tier for tier in self._lower}
        for key, name in zip(keys, located.tiers, strict=False):
            if name == dram.name:
                continue
            if self._promote(by_name[name], key, nbytes) is None:
                return
            dram.release(key)

    def _dram_hit(self, key: Key) -> None:
        """Count a DRAM hit as a use for disk admission; the use that admits a chunk not on
        disk yet writes its DRAM copy there in the background."""
        dram, disk = self._dram, self._disk
        if disk is None or dram is None or not self._admission.on_hit(key):
            return
        view = None if disk.contains_prefix([key]) else dram.acquire(key, count=False)
        if view is not None:
            release = functools.partial(dram.release, key)
            self._write_behind(key, view, release, (disk,), dram.expires_ns(key))
