"""Eviction order (LRU) with pins: a pinned chunk is never chosen as a victim.

Callers touch a request's chunks tail first, so the head of a prefix ends up most recent and
tail chunks are evicted before head chunks.

Two kinds of pins, kept apart: reader pins (`pin`/`unpin`, counted: a chunk being read or
written is never freed under its user) and holds (`hold`/`unhold`: a user pinned the chunk,
`BoundCache.pin`; a set, with each held chunk's bytes, bounded by the caller). Held keys sit in
an order of their own, so finding a victim never walks past them; unholding one makes it the
most recently used evictable key. A reader's unpin never drops a hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping

from kvtier.keys import Key


class LRUPolicy:
    """Least-recently-used order over keys, O(1) per operation (skipping pinned victims)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # evictable, least recent first
        self._held: OrderedDict[Key, int] = OrderedDict()  # held key -> its bytes
        self._pins: dict[Key, int] = {}
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._order) + len(self._held)

    def __contains__(self, key: object) -> bool:
        return key in self._order or key in self._held

    def keys(self) -> Iterator[Key]:
        yield from self._order
        yield from self._held

    def add(self, key: Key) -> None:
        if key in self._held:
            self._held.move_to_end(key)
            return
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark keys used, in the given order (the last becomes the most recent)."""
        order, held = self._order, self._held
        for key in keys:
            if key in order:
                order.move_to_end(key)
            elif key in held:
                held.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)
        self.held_bytes -= self._held.pop(key, 0)

    def pin(self, key: Key) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> int:
        """Drop one pin; returns the pins left."""
        left = self._pins[key] - 1
        if left:
            self._pins[key] = left
        else:
            del self._pins[key]
        return left

    def pinned(self, key: Key) -> bool:
        return key in self._pins

    def hold(self, sizes: Mapping[Key, int], max_bytes: int) -> list[Key] | None:
        """Hold every key of `sizes` (key -> bytes) present and not held yet, if the held
        bytes then stay within `max_bytes`; the keys newly held, or None (nothing held)."""
        new = {key: n for key, n in sizes.items() if key in self._order}
        if self.held_bytes + sum(new.values()) > max_bytes:
            return None
        for key, n in new.items():
            del self._order[key]
            self._held[key] = n
        self.held_bytes += sum(new.values())
        return list(new)

    def unhold(self, keys: Iterable[Key]) -> list[Key]:
        """Make held keys evictable again (most recently used); the keys that were held."""
        freed = []
        for key in keys:
            n = self._held.pop(key, None)
            if n is not None:
                self.held_bytes -= n
                self._order[key] = None
                freed.append(key)
        return freed

    def held(self, key: Key) -> bool:
        return key in self._held

    @property
    def held_count(self) -> int:
        return len(self._held)

    def victim(self) -> Key | None:
        """The least recently used unpinned, unheld key, or None when there is none."""
        for key in self._order:
            if key not in self._pins:
                return key
        return None
