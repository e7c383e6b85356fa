"""The disk tier's file I/O: whole files written from, and read into, lists of views with
`os.pwritev` / `os.preadv` (at most 1024 views a call, short transfers resumed), with O_DIRECT
for page-aligned writes where the file system takes it.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

DIRECT_ALIGN = 4096  # O_DIRECT: buffer addresses and lengths in whole pages


class FileWriter:
    """Writes new files; with O_DIRECT when every view is page-aligned (the page cache would
    only add a copy, and on some hosts costs more CPU than the rest of a save), and plain
    writes where the file system refuses O_DIRECT (tmpfs). Thread-safe."""

    def __init__(self, header_bytes: int) -> None:
        self._direct = True  # O_DIRECT writes, until the file system refuses one
        self._header_bytes = header_bytes
        self._local = threading.local()

    def header_buffer(self) -> memoryview:
        """This thread's page-aligned buffer of `header_bytes` for a file's header (zero after
        what is packed into it)."""
        header: memoryview | None = getattr(self._local, "header", None)
        if header is None:
            header = self._local.header = memoryview(mmap.mmap(-1, self._header_bytes))
        return header

    def write(self, path: Path, views: list[memoryview]) -> None:
        if self._direct and _aligned(views):
            try:
                _write_views(path, views, os.O_DIRECT)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
        _write_views(path, views, 0)


class FileRead(NamedTuple):
    """A read of a whole file: the bytes read into the views, and the file's size."""

    read_bytes: int
    file_bytes: int


def read_file(path: Path, views: list[memoryview]) -> FileRead:
    """Read a file into `views` until they are full or the file ends; OSError when it cannot
    be opened (ENOENT: there is no such file) or read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return FileRead(_pread_all(fd, views), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _pread_all(fd: int, views: list[memoryview]) -> int:
    """Read until the views are full or the file ends; returns the bytes read."""
    offset = 0
    while views:
        n = os.preadv(fd, views[:1024], offset)
        if n == 0:
            break
        offset += n
        views = _advance(views, n)
    return offset


def _aligned(views: list[memoryview]) -> bool:
    """Every view starts on a page and spans whole pages (what O_DIRECT asks)."""
    for view in views:
        if view.nbytes % DIRECT_ALIGN or np.frombuffer(view, np.uint8).ctypes.data % DIRECT_ALIGN:
            return False
    return True


def _write_views(path: Path, views: list[memoryview], flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
    try:
        _pwrite_all(fd, views)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, views: list[memoryview]) -> None:
    offset = 0
    while views:
        n = os.pwritev(fd, views[:1024], offset)
        offset += n
        views = _advance(views, n)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views left after `n` bytes were transferred."""
    i = 0
    while i < len(views) and n >= views[i].nbytes:
        n -= views[i].nbytes
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
