"""A client's read-only view of a cache server's DRAM tier in shared memory (same host only).

A server started with `dram_shm` answers MAP with the path of its DRAM file (a
`/proc/<pid>/fd/<fd>` link to an unlinked 0600 file), its size and its identity (device,
inode). The client opens that path, checks the identity, so that a path that names some other
file (another PID namespace, a restarted server) is never read, and maps it read-only. Page
tables are filled in by a background thread (first-touch faults cost as much as the copy).
"""

from __future__ import annotations

import mmap
import os
import threading

from kvtier.errors import ProtocolError
from kvtier.pool import SharedFile
from kvtier.server.protocol import MAP_INFO

_MADV_POPULATE_READ = 22  # linux/mman.h; not exported by the mmap module


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
        fd = os.open(shared.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (shared.device, shared.inode):
                raise OSError(f"{shared.path} is not the server's DRAM file")
            if st.st_size < shared.capacity_bytes:
                raise OSError(f"{shared.path} is shorter than the server's DRAM tier")
            self._map = mmap.mmap(fd, shared.capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        threading.Thread(target=self._fault_in, name="kvtier-map-fault", daemon=True).start()

    def chunk(self, offset: int, nbytes: int) -> memoryview:
        """The `nbytes` at `offset`; ProtocolError if the server named bytes outside the file."""
        if offset < 0 or offset + nbytes > self.shared.capacity_bytes:
            raise ProtocolError(f"server named bytes {offset}+{nbytes} outside its DRAM file")
        return self._view[offset : offset + nbytes]

    def _fault_in(self) -> None:
        step = 2 << 20
        size = self.shared.capacity_bytes
        for offset in range(0, size, step):
            try:
                self._map.madvise(_MADV_POPULATE_READ, offset, min(step, size - offset))
            except (OSError, ValueError):  # kernels before 5.14 lack it: pages fault lazily
                return
