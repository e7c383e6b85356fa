"""A client's view of a cache server's DRAM tier in shared memory (same host only).

A server started with `dram_shm` answers MAP with the path of its DRAM file (a
`/proc/<pid>/fd/<fd>` link to an unlinked 0600 file), its size and its identity (device,
inode). The client opens that path, checks the identity, so that a path that names some other
file (another PID namespace, a restarted server) is never read, and maps it read-only. Page
tables are filled in by a background thread (first-touch faults cost as much as the copy).
A server that takes same-host writes (PUT_LOCAL) has the file mapped writable as well, on the
first slot it lends.
"""

from __future__ import annotations

import mmap
import os
import threading

from kvtier.errors import ProtocolError
from kvtier.pool import SharedFile
from kvtier.protocol import MAP_INFO

_MADV_POPULATE_READ = 22  # linux/mman.h; not exported by the mmap module
_MADV_POPULATE_WRITE = 23


def parse_map_reply(payload: bytes) -> SharedFile:
    """The shared file a MAP reply describes; raises ProtocolError for a garbled one."""
    if len(payload) <= MAP_INFO.size:
        raise ProtocolError(f"MAP reply of {len(payload)} bytes carries no path")
    capacity, device, inode = MAP_INFO.unpack_from(payload)
    try:
        path = payload[MAP_INFO.size :].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("MAP reply path is not UTF-8") from exc
    return SharedFile(path, capacity, device, inode)


class SharedMapping:
    """A read-only mapping of the file `shared` names; OSError if it cannot be opened, is not
    that file (identity differs) or is shorter than announced."""

    def __init__(self, shared: SharedFile) -> None:
        self.shared = shared
        self._map = self._open(os.O_RDONLY, mmap.PROT_READ)
        self._view = memoryview(self._map)
        self._writable: memoryview | None = None
        self._lock = threading.Lock()
        self._faulting(self._map, _MADV_POPULATE_READ)

    def chunk(self, offset: int, nbytes: int) -> memoryview:
        """The `nbytes` at `offset`; ProtocolError if the server named bytes outside the file."""
        self._check(offset, nbytes)
        return self._view[offset : offset + nbytes]

    def slot(self, offset: int, nbytes: int) -> memoryview:
        """The `nbytes` at `offset`, writable (the file is mapped read-write on first use;
        OSError if it cannot be)."""
        self._check(offset, nbytes)
        with self._lock:
            if self._writable is None:
                writable = self._open(os.O_RDWR, mmap.PROT_READ | mmap.PROT_WRITE)
                self._writable = memoryview(writable)
                self._faulting(writable, _MADV_POPULATE_WRITE)
        return self._writable[offset : offset + nbytes]

    def _check(self, offset: int, nbytes: int) -> None:
        if offset < 0 or offset + nbytes > self.shared.capacity_bytes:
            raise ProtocolError(f"server named bytes {offset}+{nbytes} outside its DRAM file")

    def _open(self, flags: int, prot: int) -> mmap.mmap:
        shared = self.shared
        fd = os.open(shared.path, flags | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (shared.device, shared.inode):
                raise OSError(f"{shared.path} is not the server's DRAM file")
            if st.st_size < shared.capacity_bytes:
                raise OSError(f"{shared.path} is shorter than the server's DRAM tier")
            return mmap.mmap(fd, shared.capacity_bytes, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)

    def _faulting(self, mapped: mmap.mmap, advice: int) -> None:
        """Fill in the mapping's page tables in the background."""

        def run() -> None:
            step = 2 << 20
            size = self.shared.capacity_bytes
            for offset in range(0, size, step):
                try:
                    mapped.madvise(advice, offset, min(step, size - offset))
                except (OSError, ValueError):  # kernels before 5.14 lack it: faults come lazily
                    return

        threading.Thread(target=run, name="kvtier-map-fault", daemon=True).start()
