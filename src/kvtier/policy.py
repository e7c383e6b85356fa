"""Eviction order (LRU) with pins: a pinned chunk is never chosen as a victim.

Callers touch a request's chunks tail first, so the head of a prefix ends up most recent and
tail chunks are evicted before head chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvtier.keys import Key


class LRUPolicy:
    """Least-recently-used order over keys, O(1) per operation (skipping pinned victims)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()
        self._pins: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def add(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark keys used, in the given order (the last becomes the most recent)."""
        order = self._order
        for key in keys:
            if key in order:
                order.move_to_end(key)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

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

    def victim(self) -> Key | None:
        """The least recently used unpinned key, or None when every key is pinned."""
        for key in self._order:
            if key not in self._pins:
                return key
        return None
