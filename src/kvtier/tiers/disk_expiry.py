"""TTLs in the disk tier.

A chunk saved with a TTL has its expiry time in its header (0: never; files from before TTLs
have 0 there); one past its time is a miss and is deleted, unless a user pinned it (`hold`).
So that a restart knows which chunks expire without reading every header, the expiry of each
such chunk is also appended to the `expiry` journal (once per put) before the chunk is
published; on open, each journaled expiry is checked against its chunk's header (the truth)
and the journal is compacted. While running, the journal is compacted when it has grown well
past the live expiries: under the journal lock, which appends take too, and keeping the
expiries of puts journaled but not yet published, so a compaction loses no record. A read
always takes the expiry from the header into the index (a chunk whose record was lost is
still promoted with its expiry).

`Expiring` is a part of `DiskTier` (its base class); it uses the tier's index and lock,
declared below.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.expiry import Expiries, ExpiryLog
from kvtier.keys import Key
from kvtier.policy import LRUPolicy
from kvtier.quota import Ledger
from kvtier.tiers.base import Counters


class Expiring:
    """The TTL half of `DiskTier`."""

    root: Path
    _lock: threading.Lock
    _sizes: dict[Key, int]
    _lru: LRUPolicy
    _quota: Ledger
    _ttl: Expiries
    _ttl_log: ExpiryLog | None
    _ttl_log_lock: threading.Lock  # the journal's: appends, and compactions whole
    _ttl_pending: dict[tuple[Key, int], int]  # (key, expiry) journaled by puts in flight
    _used: int
    _count: Counters

    if TYPE_CHECKING:

        def path(self, key: Key) -> Path: ...
        def _header_expiry(self, key: Key) -> int | None: ...
        @staticmethod
        def _unlink(path: Path) -> None: ...

    def expires_ns(self, key: Key) -> int:
        with self._lock:
            return self._ttl.get(key)

    def _expire(self, key: Key, now: int) -> bool:
        """Lock held: delete a published chunk past its TTL unless pinned; whether it was."""
        if not self._ttl.expired(key, now) or self._lru.held(key) or key not in self._sizes:
            return False
        self._used -= self._sizes.pop(key)
        self._lru.remove(key)
        self._quota.remove(key)
        self._ttl.discard(key)
        self._count.expired += 1
        self._unlink(self.path(key))
        return True

    def _log_expiry(self, key: Key, expires_ns: int) -> None:
        """Journal a chunk's expiry before it is published; OSError (nothing journaled) if
        the journal cannot take it. Compactions keep it until `_logged_done`."""
        log = self._ttl_log
        assert log is not None
        with self._ttl_log_lock:
            log.append(key, expires_ns)
            item = (key, expires_ns)
            self._ttl_pending[item] = self._ttl_pending.get(item, 0) + 1

    def _logged_done(self, key: Key, expires_ns: int) -> None:
        """The put that journaled this expiry has ended (its chunk published or not)."""
        with self._ttl_log_lock:
            item = (key, expires_ns)
            left = self._ttl_pending.pop(item) - 1
            if left:
                self._ttl_pending[item] = left

    def _compact_expiries(self) -> None:
        """Rewrite the journal with the live expiries (the index's, and those of puts not yet
        published) once it has grown well past them; OSError if that fails (the journal
        keeps its records). The journal lock is held throughout: no append is lost."""
        log = self._ttl_log
        assert log is not None
        with self._ttl_log_lock:
            with self._lock:
                if not log.compaction_due(len(self._ttl)):
                    return
                kept = dict(self._ttl.items())
            for key, at in self._ttl_pending:
                kept[key] = at
            log.rewrite(kept.items())

    def _load_expiries(self) -> None:
        """Expiry times of the chunks that have one, from the journal, each checked against
        its chunk's header; then the journal holds exactly those."""
        log = self._ttl_log = ExpiryLog(self.root / "expiry")
        for key, at in log.recorded().items():
            if key in self._sizes and self._header_expiry(key) == at:
                self._ttl.set(key, at)
        log.rewrite(self._ttl.items())
