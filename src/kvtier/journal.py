"""An append-only file of small records that survives `kill -9`.

Each record is framed by its length and an xxh3-64 checksum of its bytes: a record torn by a
crash mid-append fails its check, and replay stops there. An append the file system cuts
short (a full disk) is undone: the file is truncated back to its last whole record and the
append raises, so later records stay readable. `rewrite` replaces the whole file atomically
(write a temporary file, fsync it, rename it over the old one; a failed rewrite removes the
temporary file and keeps the old one), so compacting never loses the records it keeps. With
`sync`, every append is fsynced before it returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import xxhash

FRAME = struct.Struct("<IQ")  # record bytes, xxh3-64 of the record


class Journal:
    """One journal file; thread-safe. Opening it reads (`records`) and compacts nothing:
    the owner calls `rewrite` with what it keeps."""

    def __init__(self, path: Path, sync: bool) -> None:
        self.path = path
        self._sync = sync
        self._lock = threading.Lock()
        self.records = _read(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._bytes = os.fstat(self._fd).st_size  # where the next record starts

    def append(self, record: bytes) -> None:
        """Append one record; OSError (nothing appended) if the file system refuses it."""
        frame = FRAME.pack(len(record), xxhash.xxh3_64_intdigest(record)) + record
        with self._lock:
            try:
                _write_all(self._fd, frame)
                if self._sync:
                    os.fsync(self._fd)
            except BaseException:
                with contextlib.suppress(OSError):  # a torn record would hide all later ones
                    os.ftruncate(self._fd, self._bytes)
                raise
            self._bytes += len(frame)

    def rewrite(self, records: Iterable[bytes]) -> None:
        """Replace the file's records with `records`, atomically; on OSError the file keeps
        its records and no temporary file is left."""
        data = b"".join(FRAME.pack(len(r), xxhash.xxh3_64_intdigest(r)) + r for r in records)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._lock:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                os.rename(tmp, self.path)  # fd now appends to the new journal
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(self.path.parent)
            if self._fd < 0:  # closed meanwhile: it stays closed
                os.close(fd)
                return
            os.close(self._fd)
            self._fd, self._bytes = fd, len(data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _read(path: Path) -> list[bytes]:
    """The whole records at the start of the file (none if it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    records, at = [], 0
    while at + FRAME.size <= len(data):
        size, digest = FRAME.unpack_from(data, at)
        record = data[at + FRAME.size : at + FRAME.size + size]
        if len(record) != size or xxhash.xxh3_64_intdigest(record) != digest:
            break  # torn by a crash mid-append: what follows is not trusted
        records.append(record)
        at += FRAME.size + size
    return records


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` (resuming short writes); OSError if the file system stops it."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no room to append to the journal")
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
