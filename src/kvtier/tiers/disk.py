"""Local-SSD tier: one file per chunk, checksummed, crash-safe, persistent, LRU-bounded.

A chunk is written to `tmp/`, then renamed into its shard directory (publish); a torn write
is never visible under a chunk's name. Every file starts with a header holding the key, the
payload size and an xxh3-64 checksum of key and payload; a file that fails verification is
a miss, is counted and deleted. After a restart (clean or `kill -9`) the directory scan finds
every published chunk again, in the LRU order its recency journal kept (`disk_recency.py`).
A full file system or quota makes the tier evict its own oldest chunks and retry, and hold
less until room returns (`disk_space.py`).

A chunk saved with a TTL has its expiry time in its header; past it, the chunk is a miss and
is deleted unless pinned (`disk_expiry.py`). Files are written and read with vectored I/O,
O_DIRECT where it helps (`disk_io.py`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import xxhash

from kvtier.errors import ConfigError
from kvtier.expiry import Expiries, ExpiryLog, now_ns
from kvtier.keys import KEY_BYTES, Key
from kvtier.policy import LRUPolicy
from kvtier.quota import NO_QUOTA, Ledger, Usage
from kvtier.tiers.base import Counters, TierStats, Views, total_bytes
from kvtier.tiers.disk_expiry import Expiring
from kvtier.tiers.disk_io import FileWriter, read_file
from kvtier.tiers.disk_recency import Rank, RecencyJournal
from kvtier.tiers.disk_space import SpaceGuard, is_full

MAGIC = b"KVTIERC1"
HEADER = struct.Struct("<8sHH16sQQQ")  # magic, version, flags, key, payload bytes, checksum,
# expiry (unix ns; 0: never)
HEADER_BYTES = 4096  # payload starts page-aligned
VERSION = 1
SUFFIX = ".kv"
FULL_RETRIES = 4  # writes retried after evicting for a full file system, per chunk
UNFINISHED = OSError("the chunk write did not finish")


class ChunkHeader(NamedTuple):
    key: Key
    payload_bytes: int
    checksum: int
    expires_ns: int = 0


def checksum(key: Key, views: Views) -> int:
    h = xxhash.xxh3_64(key)
    for view in views:
        h.update(view)
    return h.intdigest()


def parse_header(buf: bytes | bytearray | memoryview) -> ChunkHeader | None:
    """The header of a chunk file, or None if it is not one of ours."""
    if len(buf) < HEADER.size:
        return None
    magic, version, _flags, key, nbytes, digest, expires = HEADER.unpack_from(buf)
    if magic != MAGIC or version != VERSION:
        return None
    return ChunkHeader(key, nbytes, digest, expires)


class DiskTier(Expiring):
    """Bounded by `capacity_bytes` of chunk files (headers included), plus writes in flight,
    and by the room the file system has (re-read at most every `space_check_s`). Recency is
    journaled every `recency_flush_s` (what a `kill -9` may lose of the LRU order)."""

    name = "disk"

    def __init__(
        self,
        directory: str | Path,
        capacity_bytes: int,
        quota: Ledger = NO_QUOTA,
        space_check_s: float = 1.0,
        recency_flush_s: float = 1.0,
        trim: bool = True,
    ) -> None:
        """`quota`: bytes per key namespace (the server's tenants), see `quota.py`.
        A directory holding more than `capacity_bytes` (disk_bytes shrank) is trimmed at open;
        with `trim=False` only when the owner calls `trim()`, having held its pinned chunks."""
        self.root = Path(directory) / "kvtier-v1"
        self.capacity_bytes = capacity_bytes
        self.max_chunk_bytes = max(0, capacity_bytes - HEADER_BYTES)  # a file is header + payload
        self._tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._sizes: dict[Key, int] = {}
        self._inflight: dict[Key, int] = {}
        self._lru = LRUPolicy()
        self._quota = quota  # counts chunks being written too (never their victims)
        self._ttl = Expiries()
        self._ttl_log: ExpiryLog | None = None
        self._ttl_log_lock = threading.Lock()
        self._ttl_pending: dict[tuple[Key, int], int] = {}
        self._used = 0
        self._count = Counters()
        self._files = FileWriter(HEADER_BYTES)
        self._space = SpaceGuard(self.root, capacity_bytes, space_check_s)
        self._journal = RecencyJournal(
            self.root / "RECENCY", self._tmp / "RECENCY", recency_flush_s, self._lru_order
        )
        self._lockfile = self._open_exclusive()
        self._loaded = False  # close() writes the journal only for a complete index
        try:
            self._load_index()
            self._load_expiries()
            if trim:
                self.trim()
            self._loaded = True
        except BaseException as exc:
            self.close()  # release the lock: a later open in this process must not be refused
            if isinstance(exc, OSError):
                raise ConfigError(
                    f"disk_dir: cannot read {self.root}: {exc}; fix or remove what is there"
                ) from exc
            raise

    # -- the Tier interface ---------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        with self._lock:
            n, now = 0, now_ns()
            for key in keys:
                if key not in self._sizes or self._expire(key, now):
                    break
                n += 1
            return n

    def get_into(self, key: Key, dst: Views) -> bool:
        with self._lock:
            known = key in self._sizes and not self._expire(key, now_ns())
            self._count.misses += not known
        if not known:
            return False
        ok = self._read(key, dst)
        with self._lock:
            if ok:
                self._count.hits += 1
            else:
                self._count.misses += 1
        return ok

    def put(self, key: Key, src: Views, expires_ns: int = 0) -> bool:
        """Store a chunk; on ENOSPC/EDQUOT (of its file or of the expiry journal) evict older
        chunks and retry (a few times). `expires_ns`: when the chunk expires (wall clock,
        `kvtier.expiry`); 0 never."""
        size = HEADER_BYTES + total_bytes(src)
        logged = False  # the expiry is journaled once per put, before the first write
        try:
            for _ in range(1 + FULL_RETRIES):
                if not self._reserve(key, size):
                    return key in self._sizes
                error: OSError | None = UNFINISHED  # if an exception escapes: never published
                try:
                    if expires_ns and not logged:
                        self._log_expiry(key, expires_ns)
                        logged = True
                        self._compact_expiries()
                    error = self._write(key, src, expires_ns)
                except OSError as exc:  # the expiry journal's: the write's error
                    error = exc
                finally:
                    self._settle(key, size, error, expires_ns)
                if error is None:
                    return True
                if not is_full(error):
                    return False
        finally:
            if logged:
                self._logged_done(key, expires_ns)
        with self._lock:
            self._count.errors += 1  # still no room after evicting for every retry
        return False

    def touch(self, keys: Sequence[Key]) -> None:
        with self._lock:
            self._lru.touch(keys)
            self._quota.touch(keys)
            held = [key for key in keys if key in self._sizes]
            if held:
                self._journal.note(held)

    def stats(self) -> TierStats:
        with self._lock:
            stats = self._count.snapshot(
                self.name,
                self.capacity_bytes,
                self._used,
                len(self._sizes),
                self._lru.held_bytes,
                self._lru.held_count,
            )
            return stats._replace(
                errors=stats.errors + self._journal.errors,
                out_of_space=self._space.full_errors + self._journal.full_errors,
                effective_capacity_bytes=self._space.effective_bytes,
            )

    def usage(self) -> dict[str, Usage]:
        """Bytes and chunks per key namespace (empty without a quota ledger)."""
        with self._lock:
            return self._quota.usage()

    def close(self) -> None:
        if self._ttl_log is not None:
            self._ttl_log.close()
        if self._lockfile >= 0:
            if self._loaded:
                self._journal.close()  # the exact LRU order, for the next open
            os.close(self._lockfile)  # releases the flock
            self._lockfile = -1

    # -- beyond the interface -------------------------------------------------------------

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._sizes)

    def delete(self, key: Key) -> bool:
        """Unpublish a chunk, then delete its file (a reader holding it open keeps its data)."""
        return self._forget(key, unlink=True)

    def hold(self, keys: Sequence[Key], max_bytes: int) -> list[Key] | None:
        """Pin (for a user) the chunks of `keys` held here against eviction and expiry, if the
        pinned bytes stay within `max_bytes`; the keys newly pinned, or None (none pinned)."""
        with self._lock:
            sizes = {key: self._sizes[key] for key in keys if key in self._sizes}
            return self._lru.hold(sizes, max_bytes)

    def unhold(self, keys: Sequence[Key]) -> int:
        """Make user-pinned chunks evictable again (deleting those past their TTL)."""
        with self._lock:
            freed = self._lru.unhold(keys)
            now = now_ns()
            for key in freed:
                self._expire(key, now)
            return len(freed)

    def trim(self) -> None:
        """Drop chunks until the tier fits its capacity (after an open with less of it): those
        past their TTL first, then the least recently used; never a held (pinned) one."""
        with self._lock:
            if self._used <= self.capacity_bytes:
                return
            now = now_ns()
            for key in self._ttl.due(now):
                self._expire(key, now)
            while self._used > self.capacity_bytes:
                victim = self._lru.victim()
                if victim is None:
                    return
                self._evict(victim)

    def chunk_bytes(self, key: Key) -> int | None:
        """Payload size of a stored chunk, or None."""
        with self._lock:
            size = self._sizes.get(key)
        return None if size is None else size - HEADER_BYTES

    def path(self, key: Key) -> Path:
        name = key.hex()
        return self.root / name[:2] / (name + SUFFIX)

    def check_integrity(self) -> None:
        """Index and files agree; bytes within capacity."""
        with self._lock:
            assert self._used == sum(self._sizes.values()) + sum(self._inflight.values())
            assert self._used <= self.capacity_bytes
            assert set(self._lru.keys()) == set(self._sizes)
            self._quota.check({**self._sizes, **self._inflight})
            on_disk = {key for key, _ in _scan(self.root)}
            assert set(self._sizes) <= on_disk, "indexed chunk without a file"

    # -- internals ------------------------------------------------------------------------

    def _reserve(self, key: Key, size: int) -> bool:
        """Count `size` bytes for a new chunk, evicting LRU chunks; False if impossible."""
        with self._lock:
            self._space.check(self._held_bytes())
            capacity = self._space.effective_bytes
            now = now_ns()
            if key in self._sizes:
                self._expire(key, now)
            if key in self._sizes or key in self._inflight or size > capacity:
                return False
            if self._used + size > capacity or self._over_quota(key, size):
                for due in self._ttl.due(now):  # expired chunks go before any live one
                    self._expire(due, now)
            if not self._quota.make_room(key, size, self._busy, self._evict):
                return False  # its namespace's own chunks are all being written
            while self._used + size > capacity:
                victim = self._lru.victim()
                if victim is None:
                    return False
                self._evict(victim)
            self._inflight[key] = size
            self._used += size
            self._quota.add(key, size)
        return True

    def _busy(self, key: Key) -> bool:
        """Not a victim for the quota (lock held): being written, or pinned by a user."""
        return key in self._inflight or self._lru.held(key)

    def _over_quota(self, key: Key, size: int) -> bool:
        """Whether `size` more bytes would take `key`'s namespace past its quota (lock held;
        asked with every chunk busy, the ledger evicts nothing)."""
        return not self._quota.make_room(key, size, lambda _: True, self._evict)

    def _evict(self, victim: Key) -> None:
        """Drop a published chunk to make room (lock held)."""
        self._lru.remove(victim)
        self._quota.remove(victim)
        self._ttl.discard(victim)
        self._used -= self._sizes.pop(victim)
        self._count.evictions += 1
        # Unlink under the lock: later, a new put of the same key could already have
        # published its file. A reader holding the old file keeps its inode.
        self._unlink(self.path(victim))

    def _settle(self, key: Key, size: int, error: OSError | None, expires_ns: int) -> None:
        """End a write: publish the chunk, or give its bytes back (and on a full file
        system, lower the capacity to what is held, so the retry evicts first)."""
        with self._lock:
            del self._inflight[key]
            if error is None:
                self._sizes[key] = size
                self._lru.add(key)
                self._ttl.set(key, expires_ns)
                self._journal.note([key])
                return
            self._used -= size
            self._quota.remove(key)
            if is_full(error):
                self._space.full(self._held_bytes())
            else:
                self._count.errors += 1

    def _held_bytes(self) -> int:
        """Bytes of published chunk files (writes in flight not counted; lock held)."""
        return self._used - sum(self._inflight.values())

    def _lru_order(self) -> list[Key]:
        with self._lock:
            return list(self._lru.keys())

    def _write(self, key: Key, src: Views, expires_ns: int = 0) -> OSError | None:
        """Write and publish a chunk file; the error that stopped it, or None."""
        nbytes = total_bytes(src)
        header = self._files.header_buffer()
        digest = checksum(key, src)
        HEADER.pack_into(header, 0, MAGIC, VERSION, 0, key, nbytes, digest, expires_ns)
        final = self.path(key)
        tmp = self._tmp / f"{final.name}.{os.getpid()}.{threading.get_ident()}"
        try:
            self._files.write(tmp, [header, *src])
            final.parent.mkdir(exist_ok=True)
            os.rename(tmp, final)
            return None
        except OSError as exc:
            self._unlink(tmp)  # a partly written file never gets a chunk's name
            return exc

    def _read(self, key: Key, dst: Views) -> bool:
        header = bytearray(HEADER_BYTES)
        want = HEADER_BYTES + total_bytes(dst)
        try:
            got, file_bytes = read_file(self.path(key), [memoryview(header), *dst])
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # deleted behind our back: unpublish it
                self._forget(key, unlink=False)
            else:  # EMFILE, EIO, EACCES...: a miss now, the chunk stays
                with self._lock:
                    self._count.errors += 1
            return False
        meta = parse_header(header)
        if meta is None or meta.key != key or file_bytes != HEADER_BYTES + meta.payload_bytes:
            self._forget(
                key, unlink=True, corrupt=True
            )  # torn, truncated, renamed or a damaged header
            return False
        if meta.payload_bytes != want - HEADER_BYTES:
            return False  # asked for another size: a miss, the chunk itself is fine
        if got != want or meta.checksum != checksum(key, dst):
            self._forget(key, unlink=True, corrupt=True)
            return False
        if meta.expires_ns:  # the header is the truth, also for the index (promotions ask it)
            with self._lock:
                if key in self._sizes:
                    self._ttl.set(key, meta.expires_ns)
                now = now_ns()
                self._expire(key, now)
                return meta.expires_ns > now or self._lru.held(key)
        return True

    def _forget(self, key: Key, unlink: bool, corrupt: bool = False) -> bool:
        """Unpublish a chunk (and delete its file); True if it was published."""
        with self._lock:
            size = self._sizes.pop(key, None)
            if size is not None:
                self._used -= size
                self._lru.remove(key)
                self._quota.remove(key)
                self._ttl.discard(key)
                if unlink:  # under the lock, as in _reserve
                    self._unlink(self.path(key))
            if corrupt:
                self._count.checksum_failures += 1
        return size is not None

    def _open_exclusive(self) -> int:
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"disk_dir: cannot use {self.root.parent}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ConfigError(
                f"disk_dir: {self.root.parent} is in use by another kvtier store; give each "
                "process its own disk_dir (share chunks between processes through a server)"
            ) from exc
        return fd

    def _load_index(self) -> None:
        """Publish every complete chunk file in LRU order (a chunk's last use is the later of
        its file's mtime and its last journal record); delete leftovers of torn writes. Chunks
        that no longer fit stay until `trim`."""
        for leftover in self._tmp.iterdir():
            self._unlink(leftover)
        ranks = self._journal.read()

        def last_use(item: tuple[Key, os.stat_result]) -> Rank:
            key, st = item
            return max(Rank(st.st_mtime_ns, -1), ranks.get(key, Rank(0, -1)))

        for key, st in sorted(_scan(self.root), key=last_use):  # least recent first
            self._sizes[key] = st.st_size
            self._used += st.st_size
            self._lru.add(key)
            self._quota.add(key, st.st_size)

    def _header_expiry(self, key: Key) -> int | None:
        try:
            with open(self.path(key), "rb") as f:
                meta = parse_header(f.read(HEADER.size))
        except OSError:
            return None
        return None if meta is None or meta.key != key else meta.expires_ns

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _scan(root: Path) -> Iterator[tuple[Key, os.stat_result]]:
    for shard in os.scandir(root):
        if not shard.is_dir() or len(shard.name) != 2:
            continue
        for entry in os.scandir(shard.path):
            name = entry.name
            if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
                continue
            try:
                key = bytes.fromhex(name[: -len(SUFFIX)])
                yield key, entry.stat()
            except (ValueError, OSError):
                continue
