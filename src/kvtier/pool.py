"""One pre-allocated buffer handed out as contiguous, page-aligned extents.

The DRAM tier keeps every chunk in one anonymous mapping allocated once. Chunks of one model
all have the same size, so a freed extent is reused as it is; mixed sizes coalesce with their
free neighbours. Nothing is allocated per chunk on the hot path.

With `shm_dir` the mapping is a MAP_SHARED file instead, so that other processes of the same
user on this host can map it read-only (the node-local server's clients): the file is created
mode 0600 in `shm_dir` (a tmpfs such as /dev/shm), its room reserved with posix_fallocate (a
full tmpfs is an error now, not a SIGBUS later), and unlinked at once; it stays reachable as
`/proc/<pid>/fd/<fd>` while the pool is open, and nothing is left behind even after kill -9.

The mapping is faulted in by a background thread at start (first-touch page faults cost
20-40x a warm memcpy on the development machines).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kvtier.errors import ConfigError

ALIGN = 4096
_MADV_POPULATE_WRITE = 23  # linux/mman.h; not exported by the mmap module


class Extent(NamedTuple):
    offset: int
    nbytes: int


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class SharedFile(NamedTuple):
    """Where another process of this user on this host can map a shared pool: `path` to open,
    and the file's identity (`device`, `inode`) to check it opened the right one."""

    path: str
    capacity_bytes: int
    device: int
    inode: int


def address_of(view: memoryview) -> int:
    """The memory address of a (non-empty) buffer's first byte."""
    address: int = np.frombuffer(view, dtype=np.uint8).ctypes.data
    return address


def _shared_file(directory: Path, nbytes: int) -> int:
    """A descriptor of a new, unlinked, 0600 file of `nbytes` reserved bytes in `directory`."""
    try:
        fd, name = tempfile.mkstemp(prefix="kvtier-dram-", dir=directory)
    except OSError as exc:
        raise ConfigError(f"dram_shm: cannot create a file in {directory}: {exc.strerror}") from exc
    os.unlink(name)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(
            f"dram_shm: cannot reserve {nbytes} bytes in {directory} ({exc.strerror}): lower "
            "dram_bytes or grow that file system (e.g. docker run --shm-size)"
        ) from exc
    return fd


class SlabPool:
    """First-fit extent allocator over one fixed mmap. Not thread-safe: the owner locks."""

    def __init__(
        self, capacity_bytes: int, prefault: bool = True, shm_dir: Path | None = None
    ) -> None:
        self.capacity_bytes = capacity_bytes // ALIGN * ALIGN
        if self.capacity_bytes <= 0:
            raise ValueError(f"pool capacity must be at least {ALIGN} bytes, got {capacity_bytes}")
        self.shared: SharedFile | None = None
        self._fd: int | None = None
        if shm_dir is None:
            self._map = mmap.mmap(-1, self.capacity_bytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            self._map = self._map_shared(shm_dir)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # kernels without transparent huge pages
                self._map.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self._map)
        self._base = address_of(self.view)
        self._free_by_start: dict[int, int] = {0: self.capacity_bytes}
        self._free_by_end: dict[int, int] = {self.capacity_bytes: 0}
        self._exact: dict[int, set[int]] = {self.capacity_bytes: {0}}
        self.used_bytes = 0
        self._stop = threading.Event()
        self._prefault: threading.Thread | None = None
        if prefault:
            self._prefault = threading.Thread(target=self._fault_in, name="kvtier-prefault")
            self._prefault.daemon = True
            self._prefault.start()

    def alloc(self, nbytes: int) -> Extent | None:
        """A free extent of at least `nbytes`, or None when no free run is large enough."""
        size = aligned(nbytes)
        starts = self._exact.get(size)
        if starts:
            start = next(iter(starts))
        else:
            start = next((s for s, n in self._free_by_start.items() if n >= size), -1)
            if start < 0:
                return None
        self._take(start, size)
        self.used_bytes += size
        return Extent(start, size)

    def free(self, extent: Extent) -> None:
        start, size = extent
        self.used_bytes -= size
        end = start + size
        before = self._free_by_end.get(start)
        if before is not None:
            self._take(before, start - before)
            start = before
        after = self._free_by_start.get(end)
        if after is not None:
            self._take(end, after)
            end += after
        self._put(start, end - start)

    def _map_shared(self, directory: Path) -> mmap.mmap:
        self._fd = fd = _shared_file(directory, self.capacity_bytes)
        try:
            shared = mmap.mmap(fd, self.capacity_bytes, mmap.MAP_SHARED)
        except OSError:
            os.close(fd)
            raise
        st = os.fstat(fd)
        path = f"/proc/{os.getpid()}/fd/{fd}"
        self.shared = SharedFile(path, self.capacity_bytes, st.st_dev, st.st_ino)
        return shared

    def offset_of(self, view: memoryview) -> int:
        """The byte offset in this pool of a (non-empty) view handed out by `slot`."""
        return address_of(view) - self._base

    def slot(self, extent: Extent) -> memoryview:
        return self.view[extent.offset : extent.offset + extent.nbytes]

    def wait_prefaulted(self) -> None:
        if self._prefault is not None:
            self._prefault.join()

    def close(self) -> None:
        self._stop.set()
        if self._prefault is not None:
            self._prefault.join()
        self.view.release()
        # A caller may still hold a slot view: then the mapping goes when its last view does.
        with contextlib.suppress(BufferError):
            self._map.close()
        if self._fd is not None:
            os.close(self._fd)  # the mapping keeps the memory until it goes
            self._fd = None

    def check_integrity(self) -> None:
        """Free extents and used bytes add up to the capacity; free runs never touch."""
        free = sum(self._free_by_start.values())
        assert free + self.used_bytes == self.capacity_bytes, (free, self.used_bytes)
        for start, size in self._free_by_start.items():
            assert self._free_by_end[start + size] == start
            assert start + size not in self._free_by_start, "adjacent free runs not coalesced"

    def _take(self, start: int, size: int) -> None:
        free = self._free_by_start.pop(start)
        del self._free_by_end[start + free]
        self._discard_exact(free, start)
        if free > size:
            self._put(start + size, free - size)

    def _put(self, start: int, size: int) -> None:
        self._free_by_start[start] = size
        self._free_by_end[start + size] = start
        self._exact.setdefault(size, set()).add(start)

    def _discard_exact(self, size: int, start: int) -> None:
        starts = self._exact[size]
        starts.discard(start)
        if not starts:
            del self._exact[size]

    def _fault_in(self) -> None:
        # MADV_POPULATE_WRITE faults pages in without touching their contents, so it can run
        # while extents are already in use. Kernels before 5.14 lack it: then pages fault lazily.
        step = 2 << 20
        for offset in range(0, self.capacity_bytes, step):
            if self._stop.is_set():
                return
            try:
                self._map.madvise(
                    _MADV_POPULATE_WRITE, offset, min(step, self.capacity_bytes - offset)
                )
            except OSError:
                return


class Staged(NamedTuple):
    """An extent handed out by a StagingPool, with the pool to free it into."""

    pool: SlabPool
    extent: Extent


class StagingPool:
    """Room for `slots` chunks on their way to the lower tiers (a store with no DRAM tier).

    Nothing is mapped until a chunk size is known: `fit(nbytes)` maps a pool of `slots`
    chunks of that size, and maps a larger one (retiring the old) when a larger chunk comes.
    Extents of a retired pool stay valid until they are freed. Not thread-safe: the owner locks.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._pool: SlabPool | None = None

    @property
    def capacity_bytes(self) -> int:
        return 0 if self._pool is None else self._pool.capacity_bytes

    def fit(self, nbytes: int) -> SlabPool | None:
        """Make room for `slots` chunks of `nbytes`; the newly mapped pool (being faulted in
        by its thread), or None when the current one is large enough."""
        need = aligned(nbytes) * self.slots
        if self._pool is not None and self._pool.capacity_bytes >= need:
            return None
        old, self._pool = self._pool, SlabPool(need)
        if old is not None:
            old.close()  # extents still in use keep its mapping alive until they go
        return self._pool

    def alloc(self, nbytes: int) -> Staged | None:
        """An extent of at least `nbytes` (growing the pool to fit), or None while full."""
        self.fit(nbytes)
        pool = self._pool
        assert pool is not None
        extent = pool.alloc(nbytes)
        return None if extent is None else Staged(pool, extent)

    def wait_prefaulted(self) -> None:
        if self._pool is not None:
            self._pool.wait_prefaulted()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
