"""The room a disk tier may fill now: its configured bytes, or less while the file system
(or a quota) has less free space than that.

A write that fails with ENOSPC or EDQUOT lowers the effective capacity to what the tier holds
(less any shortfall the file system reports), so the tier evicts its own least recently used
chunks and retries, and later writes evict first instead of failing. At most every `check_s`
seconds `os.statvfs` is asked again: the effective capacity follows the tier's own bytes plus
the free space, up to the configured bytes (so it rises again once room returns). A quota is
not visible to statvfs: under EDQUOT the capacity rises back after `check_s` and the next
write that hits the quota lowers it again.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
KEEP_FREE_BLOCKS = 16  # left free for directories and the rounding of files to blocks


def is_full(exc: OSError) -> bool:
    """Whether an OS error means no room (disk full or quota exceeded)."""
    return exc.errno in FULL_ERRNOS


class SpaceGuard:
    """Effective capacity of one disk tier; its owner holds its lock around every call."""

    def __init__(self, directory: Path, capacity_bytes: int, check_s: float = 1.0) -> None:
        self.directory = directory
        self.capacity_bytes = capacity_bytes
        self.effective_bytes = capacity_bytes
        self.full_errors = 0  # ENOSPC / EDQUOT returned by the OS
        self.check_s = check_s
        self._next_check_s = 0.0

    def full(self, held_bytes: int) -> None:
        """A write failed for lack of room while the tier's published chunks took
        `held_bytes`: hold no more than that (less what statvfs says is missing)."""
        self.full_errors += 1
        room = self._room(held_bytes)
        limit = held_bytes if room is None else min(held_bytes, room)
        self.effective_bytes = max(0, min(self.effective_bytes, limit))
        self._next_check_s = time.monotonic() + self.check_s

    def check(self, held_bytes: int) -> None:
        """Follow the file system's free space (at most every `check_s` seconds)."""
        now = time.monotonic()
        if now < self._next_check_s:
            return
        self._next_check_s = now + self.check_s
        room = self._room(held_bytes)
        if room is not None:
            self.effective_bytes = max(0, min(self.capacity_bytes, room))

    def _room(self, held_bytes: int) -> int | None:
        """The tier's own bytes plus what the file system has free for it, or None when
        statvfs cannot tell."""
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return None
        return held_bytes + (st.f_bavail - KEEP_FREE_BLOCKS) * st.f_frsize
