"""An append-only file of small records that survives `kill -9`.

Each record is framed by its length and an xxh3-64 checksum of its bytes: a record torn by a
crash mid-append fails its check, and replay stops there. `rewrite` replaces the whole file
atomically (write a temporary file, fsync it, rename it over the old one), so compacting never
loses the records it keeps. With `sync`, every append is fsynced before it returns.
"""

from __future__ import annotations

import contextlib
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

    def append(self, record: bytes) -> None:
        frame = FRAME.pack(len(record), xxhash.xxh3_64_intdigest(record)) + record
        with self._lock:
            os.write(self._fd, frame)
            if self._sync:
                os.fsync(self._fd)

    def rewrite(self, records: Iterable[bytes]) -> None:
        """Replace the file's records with `records`, atomically."""
        data = b"".join(FRAME.pack(len(r), xxhash.xxh3_64_intdigest(r)) + r for r in records)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with self._lock:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            _fsync_dir(self.path.parent)
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

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


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
