"""The tier interface every backend implements, and the scatter/gather helpers they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

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


class Tier(Protocol):
    """A bounded place holding chunks by key.

    Contract: `get_into` never fills `dst` with wrong data and reports False for anything it
    cannot serve (absent, corrupt, unreachable); failures are counted in `stats`, never raised.
    """

    name: str

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


def total_bytes(views: Views) -> int:
    return sum(v.nbytes for v in views)


def copy_views(src: Views, dst: Views) -> None:
    """Copy the bytes of `src` into `dst` (same total size), memcpy per overlapping run."""
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
