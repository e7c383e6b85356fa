"""Byte quotas per namespace inside a tier: the cache server's tenants.

The cache server's keys start with a namespace tag (`NS_BYTES` bytes of a digest of the
tenant's name; `server/auth.py`), so a tier can tell whose chunk a key is, also for chunks it
finds on disk after a restart. A tier given a `Ledger` counts each namespace's bytes and
chunks and keeps one LRU order per namespace, next to its own. Before it makes room for a new
chunk in its pool, it calls `make_room`: while the chunk's own namespace would go over its
limit, that namespace's least recently used chunk not in use is evicted, never another
namespace's. Chunks of namespaces no one configured (tenants since removed from the auth
file, chunks an older server saved under another key scheme) have no quota: they are counted
together, as one namespace `UNKNOWN`, so however many such tags a disk holds, the ledger and
the server's metrics have one entry for them. Tiers call their ledger under their own lock.
`NO_QUOTA` is the ledger of every store without namespaces: it counts nothing and never evicts.

A user-pinned chunk (`hold`) is never a victim, so a tier that holds pins tells its ledger
which chunks are held: a namespace's held bytes are kept to a share of its limit
(`may_hold`), and a chunk that its namespace's held bytes leave no room for is refused at once
(`within_reach`) instead of waited for.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from kvtier.keys import Key

NS_BYTES = 4
TIERS = ("dram", "disk")  # the tiers that hold quotas (the server's own)
UNKNOWN = "#unknown"  # the name, in usage(), of every namespace no one configured
_UNKNOWN_TAG = b""  # the ledger's one space for them (no namespace's tag is empty)


def namespace_tag(name: str) -> bytes:
    """The first NS_BYTES of every key of namespace `name`."""
    return hashlib.blake2b(name.encode(), digest_size=NS_BYTES, person=b"kvtier-ns").digest()


@dataclass(frozen=True, slots=True)
class Quota:
    """One namespace's limits, in bytes as the tier counts them (DRAM: page-aligned chunk
    extents; disk: chunk files with their header). None: no limit."""

    dram_bytes: int | None = None
    disk_bytes: int | None = None

    def limit(self, tier: str) -> int | None:
        return self.dram_bytes if tier == "dram" else self.disk_bytes


@dataclass(frozen=True, slots=True)
class Quotas:
    """The namespaces a store accounts for, by name, and their limits."""

    by_name: Mapping[str, Quota]

    def ledger(self, tier: str) -> Ledger:
        """A fresh ledger for one tier ("dram" or "disk")."""
        names = {namespace_tag(name): name for name in self.by_name}
        limits = {namespace_tag(n): q.limit(tier) for n, q in self.by_name.items()}
        return Ledger(names, {tag: limit for tag, limit in limits.items() if limit is not None})


class Usage(NamedTuple):
    """One namespace's share of one tier."""

    bytes: int
    chunks: int
    limit_bytes: int | None
    evictions: int  # chunks evicted to keep this namespace within its limit


class _Space:
    __slots__ = ("bytes", "evictions", "held", "held_bytes", "order")

    def __init__(self) -> None:
        self.order: OrderedDict[Key, int] = OrderedDict()  # key -> bytes, LRU first
        self.bytes = 0
        self.evictions = 0
        self.held: set[Key] = set()  # chunks of `order` a user pinned: never victims
        self.held_bytes = 0


class Ledger:
    """Bytes, chunks and LRU order per namespace of one tier; not thread-safe (the tier's
    lock guards it)."""

    def __init__(self, names: Mapping[bytes, str], limits: Mapping[bytes, int]) -> None:
        assert set(limits) <= set(names), "a limit for a namespace no one configured"
        self._names = dict(names)
        self._limits = dict(limits)
        self._spaces: dict[bytes, _Space] = {}

    def _tag(self, key: Key) -> bytes:
        """The space `key` is counted in: its namespace's, or the one of every unknown one."""
        tag = key[:NS_BYTES]
        return tag if tag in self._names else _UNKNOWN_TAG

    def add(self, key: Key, nbytes: int) -> None:
        """Count a chunk the tier now holds (or is writing), as its namespace's most recent."""
        tag = self._tag(key)
        space = self._spaces.get(tag)
        if space is None:
            space = self._spaces[tag] = _Space()
        space.bytes += nbytes - space.order.pop(key, 0)
        space.order[key] = nbytes

    def remove(self, key: Key) -> None:
        space = self._spaces.get(self._tag(key))
        if space is not None and key in space.order:
            self.unhold([key])
            space.bytes -= space.order.pop(key)

    def may_hold(self, keys: Iterable[Key], fraction: float) -> bool:
        """Whether holding the counted `keys` not held yet keeps each namespace's held bytes
        within `fraction` of its limit (a namespace without a limit: always)."""
        more: dict[bytes, int] = {}
        for key in set(keys):
            space = self._spaces.get(self._tag(key))
            if space is not None and key in space.order and key not in space.held:
                more[self._tag(key)] = more.get(self._tag(key), 0) + space.order[key]
        for tag, nbytes in more.items():
            limit = self._limits.get(tag)
            if limit is not None and self._spaces[tag].held_bytes + nbytes > fraction * limit:
                return False
        return True

    def hold(self, keys: Iterable[Key]) -> None:
        """Count counted chunks as held by a user (never victims) until `unhold`/`remove`."""
        for key in keys:
            space = self._spaces.get(self._tag(key))
            if space is not None and key in space.order and key not in space.held:
                space.held.add(key)
                space.held_bytes += space.order[key]

    def unhold(self, keys: Iterable[Key]) -> None:
        for key in keys:
            space = self._spaces.get(self._tag(key))
            if space is not None and key in space.held:
                space.held.remove(key)
                space.held_bytes -= space.order[key]

    def within_reach(self, key: Key, nbytes: int) -> bool:
        """Whether `nbytes` more could fit `key`'s namespace once its chunks in use are let
        go: False when its held chunks leave no room for them (waiting would not help)."""
        tag = self._tag(key)
        limit = self._limits.get(tag)
        space = self._spaces.get(tag)
        held = 0 if space is None else space.held_bytes
        return limit is None or held + nbytes <= limit

    def touch(self, keys: Iterable[Key]) -> None:
        """Mark keys used, in the given order (the last becomes the most recent)."""
        for key in keys:
            space = self._spaces.get(self._tag(key))
            if space is not None and key in space.order:
                space.order.move_to_end(key)

    def make_room(
        self, key: Key, nbytes: int, busy: Callable[[Key], bool], evict: Callable[[Key], None]
    ) -> bool:
        """Evict (with `evict`) the least recently used chunks of `key`'s namespace that are
        not `busy` until `nbytes` more fit its limit; False if they cannot."""
        tag = self._tag(key)
        limit = self._limits.get(tag)
        space = self._spaces.get(tag)
        if limit is None or space is None:
            return limit is None or nbytes <= limit
        while space.bytes + nbytes > limit:
            victim = next((k for k in space.order if not busy(k)), None)
            if victim is None:
                return False
            evict(victim)  # the tier's eviction; it calls remove(victim)
            assert victim not in space.order, "evict() must remove the chunk from the ledger"
            space.evictions += 1
        return True

    def check(self, held: Mapping[Key, int]) -> None:
        """The ledger counts exactly the chunks (and bytes) the tier holds (for tests)."""
        counted = {k: n for space in self._spaces.values() for k, n in space.order.items()}
        assert counted == held, (len(counted), len(held))
        for space in self._spaces.values():
            assert space.bytes == sum(space.order.values())
            assert space.held <= space.order.keys()
            assert space.held_bytes == sum(space.order[k] for k in space.held)

    def usage(self) -> dict[str, Usage]:
        """Every configured namespace, and UNKNOWN (all the others together) once seen."""
        tags = set(self._names) | set(self._spaces)
        out = {}
        for tag in tags:
            space = self._spaces.get(tag) or _Space()
            name = self._names.get(tag, UNKNOWN)
            limit = self._limits.get(tag)
            out[name] = Usage(space.bytes, len(space.order), limit, space.evictions)
        return out


class _NoQuota(Ledger):
    """The ledger of a store without namespaces: counts nothing, never evicts."""

    def __init__(self) -> None:
        super().__init__({}, {})

    def add(self, key: Key, nbytes: int) -> None:
        return

    def remove(self, key: Key) -> None:
        return

    def touch(self, keys: Iterable[Key]) -> None:
        return

    def may_hold(self, keys: Iterable[Key], fraction: float) -> bool:
        return True

    def hold(self, keys: Iterable[Key]) -> None:
        return

    def unhold(self, keys: Iterable[Key]) -> None:
        return

    def within_reach(self, key: Key, nbytes: int) -> bool:
        return True

    def make_room(
        self, key: Key, nbytes: int, busy: Callable[[Key], bool], evict: Callable[[Key], None]
    ) -> bool:
        return True

    def check(self, held: Mapping[Key, int]) -> None:
        return


NO_QUOTA: Ledger = _NoQuota()
