"""The server's receive budget: memory for frame bodies, shared by every connection.

One anonymous mapping of `capacity_bytes` (faulted in as it is used, then reused warm) is
handed out as extents, one per frame body, and taken back once the frame is handled. A
connection that finds no room waits in FIFO order (its reads are paused: backpressure) and is
handed an extent as soon as one is free. The server's receive memory is therefore bounded by
the budget whatever the headers announce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kvtier.pool import Extent, SlabPool


class Grant(NamedTuple):
    extent: Extent
    view: memoryview  # exactly the body's bytes


Waiter = Callable[[Grant], None]


class RecvBudget:
    """Extents of one fixed mapping, FIFO among waiters. Event-loop thread only."""

    def __init__(self, capacity_bytes: int) -> None:
        self._pool = SlabPool(capacity_bytes, prefault=False)
        self.capacity_bytes = self._pool.capacity_bytes
        self._waiting: dict[object, tuple[int, Waiter]] = {}

    @property
    def used_bytes(self) -> int:
        return self._pool.used_bytes

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def take(self, owner: object, nbytes: int, waiter: Waiter) -> Grant | None:
        """An extent now, or None: then `waiter(grant)` is called once one is free (unless
        `cancel(owner)` came first). Nobody overtakes a waiter."""
        assert 0 < nbytes <= self.capacity_bytes
        grant = None if self._waiting else self._alloc(nbytes)
        if grant is None:
            self._waiting[owner] = (nbytes, waiter)
        return grant

    def give(self, grant: Grant) -> None:
        """Return an extent and hand the room to waiters, oldest first."""
        self._pool.free(grant.extent)
        while self._waiting:
            owner = next(iter(self._waiting))
            nbytes, waiter = self._waiting[owner]
            got = self._alloc(nbytes)
            if got is None:
                return
            del self._waiting[owner]
            waiter(got)

    def cancel(self, owner: object) -> None:
        self._waiting.pop(owner, None)

    def close(self) -> None:
        self._waiting.clear()
        self._pool.close()

    def _alloc(self, nbytes: int) -> Grant | None:
        extent = self._pool.alloc(nbytes)
        if extent is None:
            return None
        return Grant(extent, self._pool.slot(extent)[:nbytes])
