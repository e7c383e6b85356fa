"""Store: the one orchestrator. Lookup across tiers, promote on hit, write-through to lower
tiers in the background, prefetch on hint. Tiers never know about each other.

DRAM is written through to disk and remote, so a chunk evicted from DRAM is already on disk
(it stays pinned in DRAM until its write has landed): evictions never drop a chunk the disk
could hold, except one not yet admitted to it (below). Without a DRAM tier, saves go through a
small staging pool instead: room for io_workers + 2 chunks of the largest chunk size bound
(mapped and faulted in by `bind`); a save waits while every slot is still being written. A
store whose one tier is a same-host server that takes writes into its shared DRAM file saves
straight there, in the caller's thread. With `disk_admit_after` > 1 a save reaches the disk
only once its chunk is admitted (see admission.py); the DRAM hit that admits a chunk writes its
DRAM copy to disk, and a chunk DRAM evicts before it was admitted is gone (counted in
`admission_rejected`).

Saves and their background writes are in `writebehind.py`; DRAM misses served from the lower
tiers and promoted into DRAM, prefetch and the admission of DRAM hits in `promotion.py`.
User pins (`pin_keys`, `pins.py`) and TTLs (`write_chunk(expires_ns=...)`, `expiry.py`) are
kept by the local tiers; a chunk promoted or written down keeps its expiry and, while pinned,
is held in its new tier too.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.admission import disk_admission
from kvtier.cache import BoundCache
from kvtier.chunkstore import Located
from kvtier.config import StoreConfig
from kvtier.errors import ConfigError, KvtierError, StoreClosed
from kvtier.inplace import InPlace
from kvtier.jobs import Jobs
from kvtier.keys import Key, Salt
from kvtier.layout import KVLayout
from kvtier.pins import Pinning
from kvtier.pool import SharedFile, StagingPool
from kvtier.promotion import Acquired, Promotion
from kvtier.quota import NO_QUOTA, Ledger, Quotas, Usage
from kvtier.tiers.base import Tier, TierStats, Views, check_chunk_fits
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier
from kvtier.writebehind import WriteBehind

if TYPE_CHECKING:
    from kvtier.tiers.remote import Locator

STAGING_SPARE = 2  # staging slots beyond one per I/O worker: one being copied, one queued


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counters of the store and of each tier (in lookup order: dram, disk, remote)."""

    tiers: tuple[TierStats, ...]
    saved_chunks: int
    dropped_chunks: int
    pending_writes: int
    admission_rejected: int = 0  # saves kept off the disk tier: their chunk was not admitted
    disk_written_bytes: int = 0  # chunk bytes the store wrote to the disk tier

    def tier(self, name: str) -> TierStats:
        return next(t for t in self.tiers if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiers": {t.name: t._asdict() for t in self.tiers},
            "saved_chunks": self.saved_chunks,
            "dropped_chunks": self.dropped_chunks,
            "pending_writes": self.pending_writes,
            "admission_rejected": self.admission_rejected,
            "disk_written_bytes": self.disk_written_bytes,
        }


class Store(InPlace, Pinning, Promotion, WriteBehind):
    """Tiered chunk store; thread-safe. Use `bind()` to get a per-model cache. Lending its
    memory in place (`writing`, `reading`, `reserve_chunk`...) is in `inplace.py`, user pins
    (`pin_keys`, `unpin_keys`) in `pins.py`, lower-tier reads and promotion into DRAM in
    `promotion.py`, saves and their background writes in `writebehind.py`."""

    def __init__(
        self,
        config: StoreConfig | None = None,
        quotas: Quotas | None = None,
        locate_remote: Locator | None = None,
    ) -> None:
        """`quotas`: bytes per key namespace in the DRAM and disk tiers, for a store whose
        keys carry one (the cache server's tenants; `quota.py`). `locate_remote`: for a
        `kvtier://` remote tier of one server that may come back elsewhere (the node-local
        process), where it is now: its URL and token (`tiers/link.py`)."""
        self.config = config = config or StoreConfig()
        lower: list[Tier] = []
        self._dram: DramTier | None = None
        dram_quota = NO_QUOTA if quotas is None else quotas.ledger("dram")
        disk_quota = NO_QUOTA if quotas is None else quotas.ledger("disk")
        try:  # if any tier fails (disk in use, token refused), close those already open
            if config.disk_dir is not None:
                size = int(config.disk_bytes or 0)
                # trimmed (if disk_bytes shrank) once its pinned chunks are held again
                lower.append(DiskTier(config.disk_dir, size, quota=disk_quota, trim=False))
            if config.remote is not None:
                lower.append(_open_remote(config, locate_remote))
            self._dram = _open_dram(config, dram_quota)
        except BaseException:
            for tier in lower:
                tier.close()
            raise
        self._lower = tuple(lower)
        self._disk = next((t for t in lower if isinstance(t, DiskTier)), None)
        self._off_disk = tuple(t for t in lower if t is not self._disk)  # for chunks not admitted
        self._admission = disk_admission(config.disk_admit_after, self._disk is not None)
        self._tiers: tuple[Tier, ...] = ((self._dram,) if self._dram else ()) + self._lower
        staged = config.io_workers + STAGING_SPARE
        self._staging = StagingPool(staged) if lower and not self._dram else None
        self._cond = threading.Condition()
        self._jobs = Jobs(config.io_workers, self._cond, config.io_nice)
        # Loads from lower tiers run here, not behind the background writes queued in _jobs.
        self._readers = ThreadPoolExecutor(config.io_workers, thread_name_prefix="kvtier-read")
        self._writing: dict[Key, int] = {}  # key -> background writes in flight
        self._saved = 0
        self._dropped = 0
        self._disk_written = 0
        self._calls = 0  # calls using the tiers now; close() waits for them
        self._closed = False
        try:
            self._open_pins(next((t for t in lower if isinstance(t, DiskTier)), None))
            if self._disk is not None:
                self._disk.trim()
        except BaseException:
            self.close()
            raise

    def bind(
        self,
        model_id: str,
        layout: KVLayout,
        salt: Salt | None = None,
        ttl_s: float | None = None,
    ) -> BoundCache:
        """A cache for one model (and tenant salt: str or bytes, a str standing for its UTF-8
        bytes) over this store's tiers. `ttl_s`: chunks it saves expire that many seconds
        after they were saved (local tiers only)."""
        if ttl_s is not None and self.config.remote is not None:
            raise ConfigError(
                "ttl_s: TTLs are kept by DRAM and disk only; this store's remote tier would "
                "keep the chunks past it. Bind without ttl_s, or use a store without remote="
            )
        cache = BoundCache(self, model_id, layout, salt, self.config.chunk_tokens, ttl_s)
        check_chunk_fits(cache.chunk_bytes, cache.chunk_tokens, self._tiers)
        if self._staging is not None:
            with self._cond:
                self._check_open()
                mapped = self._staging.fit(cache.chunk_bytes)
            if mapped is not None:
                mapped.wait_prefaulted()  # so the first saves copy into faulted-in memory
        return cache

    # -- key-level API (BoundCache and the server build on it) -----------------------------

    def locate(self, keys: Sequence[Key]) -> Located:
        """Longest run of leading keys present in some tier, and the tier of each (a same-host
        server's chunks by the server's tier: "dram", "disk")."""
        self._enter()
        try:
            return self._locate(keys, served_from=True)
        finally:
            self._leave()

    def _locate(self, keys: Sequence[Key], served_from: bool = False) -> Located:
        """Leading keys present and which of this store's tiers holds each; `served_from`:
        a chunk of a same-host server is named by the server's own tier (its DRAM is as near
        as ours), for callers choosing how to load it."""
        names: list[str] = []
        while len(names) < len(keys):
            rest = keys[len(names) :]
            for i, tier in enumerate(self._tiers):
                where = getattr(tier, "locate", None) if served_from else None
                found = where(rest) if where else (tier.name,) * tier.contains_prefix(rest)
                if found:
                    names += found[: _until_nearer(self._tiers[:i], rest[: len(found)])]
                    break
            else:
                break
        return Located(len(names), tuple(names))

    def read_chunk(self, key: Key, dst: Views, promote: bool = True) -> str | None:
        """Copy a chunk into `dst`, promoting a lower-tier hit to DRAM (unless `promote` is
        False); the serving tier's name, or None if no tier could serve it."""
        self._enter()
        try:
            if self._dram is not None and self._dram.get_into(key, dst):
                self._dram_hit(key)
                return self._dram.name
            return self._read_lower(key, dst, promote)
        finally:
            self._leave()

    def read_chunks(self, keys: Sequence[Key], dsts: Sequence[Views]) -> list[str | None]:
        """`read_chunk` for many chunks: DRAM hits are copied at once, the rest are read from
        the lower tiers in parallel (one reader's checksum overlaps another's I/O)."""
        self._enter()
        try:
            return self._read_chunks(keys, dsts)
        finally:
            self._leave()

    def acquire_chunk(self, key: Key, nbytes: int, promote: bool = True) -> Acquired | None:
        """Pin a chunk in DRAM (promoting it from a lower tier, unless `promote` is False: then
        this never waits for I/O) and return a read-only view of its `nbytes` bytes; call
        `release_chunk(key)` when done. None without a DRAM tier or when no tier can serve it."""
        dram = self._dram
        if dram is None:
            self._check_open()
            return None
        self._enter()
        try:
            view = dram.acquire(key, count_misses=promote)
            if view is not None:
                self._dram_hit(key)
                return Acquired(view, dram.name)
            return self._from_lower(key, nbytes) if promote else None
        finally:
            self._leave()

    def release_chunk(self, key: Key) -> None:
        """Unpin a chunk returned by `acquire_chunk`."""
        assert self._dram is not None
        self._dram.release(key)

    def shared_dram(self) -> SharedFile | None:
        """The file the DRAM tier lives in (`dram_shm`), for other processes on this host."""
        return None if self._dram is None else self._dram.shared

    def dram_offset(self, view: memoryview) -> int:
        """The offset in `shared_dram()` of a view returned by `acquire_chunk`."""
        assert self._dram is not None
        return self._dram.offset_of(view)

    def write_chunk(self, key: Key, src: Views, expires_ns: int = 0) -> None:
        """Copy a chunk out of `src` now; write it to the lower tiers in the background.
        `expires_ns`: when it expires (wall clock, `kvtier.expiry.expiry_ns`); 0 never.
        Raises StoreClosed once close() has begun; a call already under way completes."""
        self._enter()
        saved = False
        try:
            saved = self._write_chunk(key, src, expires_ns)
        finally:
            self._leave(saved)

    def delete_chunk(self, key: Key) -> bool:
        """Remove a chunk from the local tiers (DRAM and disk); True if any held it."""
        self._enter()
        try:
            with self._cond:
                self._cond.wait_for(lambda: key not in self._writing)
            local = [t for t in (self._dram, *self._lower) if isinstance(t, DramTier | DiskTier)]
            return sum(t.delete(key) for t in local) > 0
        finally:
            self._leave()

    def prefetch_keys(self, keys: Sequence[Key], nbytes: int) -> None:
        """Start promoting leading chunks of `nbytes` each from lower tiers into DRAM, in the
        background; stops at the first chunk no tier holds."""
        self._check_open()
        if self._dram is not None and self._lower:
            self._jobs.submit(self._prefetch, list(keys), nbytes)

    def touch(self, keys: Sequence[Key]) -> None:
        """Mark a request's keys used so its tail is evicted before its head."""
        tail_first = list(reversed(keys))
        for tier in self._tiers:
            tier.touch(tail_first)

    # -- lifecycle ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Wait until every save issued before this call has reached every tier (and every
        prefetch issued before it has ended). Saves issued meanwhile are not waited for."""
        self._jobs.flush()

    def stats(self) -> StoreStats:
        with self._cond:
            saved, dropped, pending = self._saved, self._dropped, self._jobs.pending
            written = self._disk_written
        tiers = tuple(t.stats() for t in self._tiers)
        return StoreStats(tiers, saved, dropped, pending, self._admission.rejected, written)

    def usage(self) -> dict[str, dict[str, Usage]]:
        """Bytes and chunks per key namespace (given `quotas`), by namespace, then tier."""
        out: dict[str, dict[str, Usage]] = {}
        for tier in (self._dram, *self._lower):
            if isinstance(tier, DramTier | DiskTier):
                for name, usage in tier.usage().items():
                    out.setdefault(name, {})[tier.name] = usage
        return out

    def close(self) -> None:
        """Flush, then release every tier. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True  # new calls now fail with StoreClosed
            self._cond.wait_for(lambda: self._calls == 0)  # calls under way complete
        self.flush()
        self._jobs.shutdown()
        self._readers.shutdown(wait=True)
        for tier in self._tiers:
            tier.close()
        self._pins.close()
        if self._staging is not None:
            self._staging.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def warm(self) -> None:
        """Block until the pre-allocated memory is faulted in (it is, in the background)."""
        for pool in (self._dram, self._staging):
            if pool is not None:
                pool.wait_prefaulted()

    def check_integrity(self) -> None:
        """Internal invariants of every tier (for tests)."""
        for tier in self._tiers:
            check = getattr(tier, "check_integrity", None)
            if check is not None:
                check()

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("this Store is closed; create a new one")

    def _enter(self) -> None:
        """Begin a call that uses the tiers; StoreClosed once close() has begun."""
        with self._cond:
            self._check_open()
            self._calls += 1

    def _leave(self, saved: int = 0) -> None:
        with self._cond:
            self._calls -= 1
            self._saved += saved
            if self._closed and not self._calls:
                self._cond.notify_all()

    def _holds(self, key: Key) -> bool:
        if self._dram is not None and key in self._dram:
            return True
        return any(t.contains_prefix([key]) for t in self._lower if isinstance(t, DiskTier))


def _until_nearer(nearer: Sequence[Tier], run: Sequence[Key]) -> int:
    """How much of a run of keys a farther tier holds comes before a key that a nearer tier
    holds too (which is then named by the nearer one). Nearer tiers are local (DRAM, disk):
    asking them key by key is a dictionary look-up."""
    for j, key in enumerate(run):
        if any(t.contains_prefix([key]) for t in nearer):
            return max(j, 1)
    return len(run)


def _open_dram(config: StoreConfig, quota: Ledger) -> DramTier | None:
    if not config.dram_bytes:
        return None
    shm = None if config.dram_shm is None else Path(config.dram_shm)
    return DramTier(int(config.dram_bytes), shm_dir=shm, quota=quota)


def _open_remote(config: StoreConfig, locate: Locator | None) -> Tier:
    url = config.remote_url
    assert url is not None
    ours = url.scheme in ("kvtier", "kvtiers")
    if locate is not None and not ours:
        raise ConfigError(f"only a kvtier:// server can be located again, not {url.scheme}://")
    module, cls = ("remote", "RemoteTier") if ours else ("redis", "RedisTier")
    tls: dict[str, Any] = {"ca": config.remote_ca, "locate": locate} if ours else {}
    try:
        tier: Tier = getattr(importlib.import_module(f"kvtier.tiers.{module}"), cls)(
            url, config.remote_token, **tls
        )
        return tier
    except ImportError as exc:
        raise KvtierError(f"remote tier {url.scheme}:// is not available: {exc}") from exc
