"""ChunkStore: the key-level API a bound cache needs from the store below it.

`Store` implements it and builds `BoundCache`s in `bind`; `BoundCache` depends only on this
interface, so the store imports the cache and never the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

from kvtier.keys import Key
from kvtier.tiers.base import Views


class Located(NamedTuple):
    """Where a prefix is stored: one tier name per leading chunk found."""

    chunks: int
    tiers: tuple[str, ...]


class ChunkStore(Protocol):
    """Chunks by key over tiers; thread-safe.

    Contract: a read never fills a view with wrong data: a chunk no tier can serve reads as
    None. Writes copy the caller's views before they return.
    """

    def locate(self, keys: Sequence[Key]) -> Located:
        """Longest run of leading keys present in some tier, and the tier of each."""
        ...

    def read_chunks(self, keys: Sequence[Key], dsts: Sequence[Views]) -> list[str | None]:
        """Copy each chunk into its views; the serving tier's name per chunk, or None."""
        ...

    def write_chunk(self, key: Key, src: Views, expires_ns: int = 0) -> None:
        """Copy a chunk out of `src` now; lower tiers are written in the background. A chunk
        with `expires_ns` (wall clock, 0: never) is a miss from then on."""
        ...

    def touch(self, keys: Sequence[Key]) -> None:
        """Mark a request's keys used so its tail is evicted before its head."""
        ...

    def pin_keys(self, keys: Sequence[Key]) -> int:
        """Pin the stored leading chunks of `keys` in every tier; how many were pinned."""
        ...

    def unpin_keys(self, keys: Sequence[Key]) -> int:
        """Remove pins on `keys` and their prefixes; the longest run unpinned, in chunks."""
        ...

    def prefetch_keys(self, keys: Sequence[Key], nbytes: int) -> None:
        """Start promoting the leading chunks (of `nbytes` each) towards DRAM."""
        ...
