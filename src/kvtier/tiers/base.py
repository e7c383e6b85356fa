"""The tier interface every backend implements, and the scatter/gather helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, overload

import numpy as np

from kvtier.errors import ConfigError
from kvtier.keys import Key

Views = Sequence[memoryview]
"""A chunk's bytes as an ordered list of byte views (scatter/gather; usually one, or one per
(layer, K/V) row of a caller's array)."""


class TierStats(NamedTuple):
    name: str
    capacity_bytes: int
    bytes: int
    chunks: int
    hits: int
    misses: int
    evictions: int
    errors: int
    checksum_failures: int
    out_of_space: int = 0
    """Writes the file system refused for lack of room (ENOSPC, EDQUOT); for a chunk, the disk
    tier then evicts and retries."""
    effective_capacity_bytes: int = 0
    """What the tier may hold now: `capacity_bytes`, or less while its disk is full."""
    pinned_bytes: int = 0  # chunks a user pinned (`BoundCache.pin`): never evicted
    pinned_chunks: int = 0
    expired: int = 0  # chunks reclaimed past their TTL (`Store.bind(..., ttl_s=...)`)


class Tier(Protocol):
    """A bounded place holding chunks by key.

    Contract: `get_into` never fills `dst` with wrong data and reports False for anything it
    cannot serve (absent, corrupt, unreachable); failures are counted in `stats`, never raised.
    """

    name: str
    max_chunk_bytes: int
    """The largest chunk payload this tier can ever store (capacity less its own overhead)."""

    def contains_prefix(self, keys: Sequence[Key]) -> int:
        """How many leading keys this tier holds."""
        ...

    def get_into(self, key: Key, dst: Views) -> bool:
        """Copy the chunk's bytes into `dst` (whose sizes add up to the chunk's); False on miss."""
        ...

    def put(self, key: Key, src: Views) -> bool:
        """Store a chunk (evicting as needed); False when it could not be stored."""
        ...

    def touch(self, keys: Sequence[Key]) -> None:
        """Mark keys used, the last most recently (pass a request's keys tail first)."""
        ...

    def stats(self) -> TierStats: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Counters:
    """Mutable per-tier counters; the owner holds its lock while changing them."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    errors: int = 0
    checksum_failures: int = 0
    expired: int = 0

    def snapshot(
        self,
        name: str,
        capacity_bytes: int,
        used_bytes: int,
        chunks: int,
        pinned_bytes: int = 0,
        pinned_chunks: int = 0,
    ) -> TierStats:
        """These counters with a tier's sizes, as an immutable TierStats."""
        return TierStats(
            name,
            capacity_bytes,
            used_bytes,
            chunks,
            self.hits,
            self.misses,
            self.evictions,
            self.errors,
            self.checksum_failures,
            pinned_bytes=pinned_bytes,
            pinned_chunks=pinned_chunks,
            expired=self.expired,
            effective_capacity_bytes=capacity_bytes,
        )


class ChunkViews(Sequence[memoryview]):
    """A chunk's bytes as the rows of a `(rows, row_bytes)` uint8 array (rows may be strided,
    each row contiguous). Copies between arrays take one NumPy call; the per-row memoryviews
    that scatter/gather I/O needs are made only when asked for."""

    __slots__ = ("_views", "array")

    def __init__(self, array: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        self.array = array
        self._views: list[memoryview] | None = None

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, index: int) -> memoryview: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[memoryview]: ...
    def __getitem__(self, index: int | slice) -> memoryview | Sequence[memoryview]:
        if self._views is None:
            self._views = [row.data for row in self.array]
        return self._views[index]


FIXES = {
    "dram": "raise dram_bytes or lower chunk_tokens",
    "disk": "raise disk_bytes or lower chunk_tokens (each chunk file also holds a header)",
    "remote": "lower chunk_tokens (the shared tier's largest value is fixed by its server)",
}


def check_chunk_fits(chunk_bytes: int, chunk_tokens: int, tiers: Sequence[Tier]) -> None:
    """Raise ConfigError, naming the tier, the sizes and the fix, if some tier could never
    hold a chunk of `chunk_bytes`."""
    for tier in tiers:
        if chunk_bytes > tier.max_chunk_bytes:
            fix = FIXES.get(tier.name, "lower chunk_tokens")
            raise ConfigError(
                f"a chunk of this layout is {chunk_bytes} bytes ({chunk_tokens} tokens), more "
                f"than the {tier.name} tier can hold ({tier.max_chunk_bytes} bytes a chunk); "
                f"{fix}"
            )


def total_bytes(views: Views) -> int:
    if isinstance(views, ChunkViews):
        return views.nbytes
    return sum(v.nbytes for v in views)


def _rows(views: Views) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    if isinstance(views, ChunkViews):
        return views.array
    if len(views) == 1:
        return np.frombuffer(views[0], dtype=np.uint8).reshape(1, -1)
    return None


def copy_views(src: Views, dst: Views) -> None:
    """Copy the bytes of `src` into `dst` (same total size)."""
    a, b = _rows(src), _rows(dst)
    if a is not None and b is not None:
        if a.shape == b.shape:
            np.copyto(b, a)
            return
        if b.flags.c_contiguous:
            np.copyto(b.reshape(a.shape), a)
            return
        if a.flags.c_contiguous:
            np.copyto(b, a.reshape(b.shape))
            return
    _copy_runs(src, dst)


def _copy_runs(src: Views, dst: Views) -> None:
    """memcpy per overlapping run of two lists of views."""
    si = di = s_off = d_off = 0
    while si < len(src) and di < len(dst):
        s, d = src[si], dst[di]
        n = min(s.nbytes - s_off, d.nbytes - d_off)
        d[d_off : d_off + n] = s[s_off : s_off + n]
        s_off += n
        d_off += n
        if s_off == s.nbytes:
            si, s_off = si + 1, 0
        if d_off == d.nbytes:
            di, d_off = di + 1, 0
