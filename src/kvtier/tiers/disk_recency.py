"""A disk tier's LRU order, kept across restarts in a small journal file.

Every publish and every touch is noted in memory as (key, time); a background thread appends
the notes to the journal every `flush_s` seconds. close() rewrites the journal as one record
per chunk in LRU order (so does the flush thread once the journal grows past twice that).
On open, a chunk's rank is the later of its file's mtime and its last record (a later record
wins a tie), so the order survives a restart. After `kill -9` the notes of the last `flush_s`
seconds are lost and those chunks rank by mtime: the order is at most that stale, and it only
ever decides what is evicted first, never which bytes are served.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from kvtier.keys import Key
from kvtier.tiers.disk_space import is_full

MAGIC = b"KVTRCNT1"
RECORD = struct.Struct("<16sQ")  # key, time in ns since the epoch (what file mtimes use)
COMPACT_MIN_BYTES = 1 << 20  # never rewrite a journal smaller than this while running


class Rank(NamedTuple):
    """When a chunk was last used; `seq` orders records written in the same nanosecond."""

    time_ns: int
    seq: int


class RecencyJournal:
    """Notes of use, flushed in the background. `order` returns the tier's keys, least
    recently used first (it takes the tier's lock; notes are taken under that lock)."""

    def __init__(
        self, path: Path, tmp_path: Path, flush_s: float, order: Callable[[], list[Key]]
    ) -> None:
        self.path = path
        self.tmp_path = tmp_path  # where a rewrite is prepared (the tier clears it on open)
        self.flush_s = flush_s
        self.errors = 0  # failed reads and writes: the order may be staler after a restart
        self.full_errors = 0  # writes refused for lack of room (ENOSPC, EDQUOT)
        self._order = order
        self._lock = threading.Lock()  # guards the notes
        self._notes: list[tuple[int, Sequence[Key]]] = []
        self._file_lock = threading.Lock()  # one writer of the file at a time
        self._file_bytes = 0
        self._compact_at = COMPACT_MIN_BYTES
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[Key, Rank]:
        """Each key's last record in the journal. A torn last record (or a file that is not a
        journal) is cut off, so later appends start on a record boundary."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError:
            self.errors += 1
            return {}
        whole = len(MAGIC) + (len(data) - len(MAGIC)) // RECORD.size * RECORD.size
        if data[: len(MAGIC)] != MAGIC:
            whole = 0
        if whole != len(data):
            try:
                os.truncate(self.path, whole)
            except OSError:
                self.errors += 1
        self._file_bytes = whole
        ranks: dict[Key, Rank] = {}
        if whole:
            records = RECORD.iter_unpack(data[len(MAGIC) : whole])
            for seq, (key, time_ns) in enumerate(records):
                rank = Rank(time_ns, seq)  # by time, then by place in the file
                old = ranks.get(key)
                if old is None or rank > old:
                    ranks[key] = rank
        return ranks

    def note(self, keys: Sequence[Key]) -> None:
        """Record that `keys` were used now, in this order (call with the tier's lock held)."""
        with self._lock:
            self._notes.append((time.time_ns(), tuple(keys)))
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="kvtier-disk-recency", daemon=True
                )
                self._thread.start()

    def compact(self) -> None:
        """Rewrite the journal as one record per chunk, in the tier's LRU order."""
        with self._file_lock:
            self._rewrite()

    def close(self) -> None:
        """Stop the flush thread and leave the exact LRU order on disk."""
        with self._lock:
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self.compact()

    # -- internals ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            with self._file_lock:
                self._append()
                if self._file_bytes > self._compact_at:
                    self._rewrite()

    def _take(self) -> bytes:
        with self._lock:
            notes, self._notes = self._notes, []
        return b"".join(RECORD.pack(key, t) for t, keys in notes for key in keys)

    def _append(self) -> None:
        data = self._take()
        if not data:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if os.fstat(fd).st_size == 0:
                    data = MAGIC + data
                os.write(fd, data)  # one write: a reader sees whole records or a short tail
            finally:
                os.close(fd)
            self._file_bytes += len(data)
        except OSError as exc:
            self._failed(exc)  # these notes are lost: the in-memory order is still right

    def _rewrite(self) -> None:
        now = time.time_ns()  # before the order is taken: later notes rank after it
        keys = self._order()
        data = MAGIC + b"".join(RECORD.pack(key, now) for key in keys)
        tmp = self.tmp_path
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            self._failed(exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._append()  # keep what was noted since the last flush
            return
        self._file_bytes = len(data)
        self._compact_at = max(COMPACT_MIN_BYTES, 2 * len(data))
        self._append()  # notes taken after `now` follow the snapshot

    def _failed(self, exc: OSError) -> None:
        if is_full(exc):
            self.full_errors += 1
        else:
            self.errors += 1
