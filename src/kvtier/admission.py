"""Disk admission: which chunks the store writes to its disk tier.

With `disk_admit_after=N` a chunk goes to disk only once it has been used N times. A use is
a save the store takes (a chunk it did not hold), a DRAM hit, or a promotion from the remote
tier. Uses are counted in a ghost list, as in ARC: a bounded LRU of recent keys and their
use counts that outlives the chunks' data, so a chunk that left DRAM before its second use
is admitted when it is saved again. A save whose chunk is not admitted is written to the
remote tier only (if any); when DRAM evicts it before a later use admits it, it is dropped.
N=1 (the default) is `AdmitAll`: every save is written through to disk, nothing is counted.

Saves and remote promotions ask `on_save` (write this new DRAM chunk to disk now?); DRAM hits
ask `on_hit`, which is True only for the use that admits the chunk, so the store writes its
DRAM copy to disk once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from kvtier.keys import Key

GHOST_KEYS = 1 << 16
"""Keys the ghost list remembers (about 12 MiB with its 16-byte keys): the uses of a chunk
not among the last 65,536 distinct chunks used are forgotten."""


class DiskAdmission(Protocol):
    """Decides, use by use, whether a chunk is written to disk; thread-safe."""

    rejected: int
    """Saves (and remote promotions) not written to disk because their chunk was not
    admitted yet."""

    def on_save(self, key: Key) -> bool:
        """Count a use by a new DRAM chunk; whether to write it to disk now."""
        ...

    def on_hit(self, key: Key) -> bool:
        """Count a use by a DRAM hit; True only when this use admits the chunk."""
        ...


class AdmitAll:
    """`disk_admit_after=1`: every new chunk goes to disk; no memory, nothing counted."""

    rejected = 0

    def on_save(self, key: Key) -> bool:
        return True

    def on_hit(self, key: Key) -> bool:
        return False

    def __len__(self) -> int:
        return 0


class AdmitAfter:
    """Admits a chunk on its `uses`-th use, counted in a ghost list of `capacity_keys`."""

    def __init__(self, uses: int, capacity_keys: int = GHOST_KEYS) -> None:
        if uses < 2 or capacity_keys < 1:
            raise ValueError(f"AdmitAfter needs uses >= 2 and capacity_keys >= 1, got {uses}")
        self.uses = uses
        self.capacity_keys = capacity_keys
        self.rejected = 0
        self._seen: OrderedDict[Key, int] = OrderedDict()  # key -> uses, least recent first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def on_save(self, key: Key) -> bool:
        with self._lock:
            admitted = self._count(key) >= self.uses
            self.rejected += not admitted
            return admitted

    def on_hit(self, key: Key) -> bool:
        with self._lock:
            before = self._seen.get(key, 0)
            return before < self.uses <= self._count(key)

    def _count(self, key: Key) -> int:
        """One more use of `key`, saturating at `uses`; the least recently used key is
        forgotten when the list is full. Returns the uses counted now."""
        seen = self._seen
        uses = min(seen.pop(key, 0) + 1, self.uses)
        seen[key] = uses
        if len(seen) > self.capacity_keys:
            seen.popitem(last=False)
        return uses


def disk_admission(uses: int, has_disk: bool) -> DiskAdmission:
    """The admission a store with (or without) a disk tier uses for `disk_admit_after`."""
    return AdmitAfter(uses) if has_disk and uses > 1 else AdmitAll()
