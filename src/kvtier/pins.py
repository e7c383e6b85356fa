"""User pins (`BoundCache.pin`): pinned prefixes are kept from eviction and from expiry in
every tier that holds them.

A pin names a prefix: the keys of the leading chunks that were stored when it was made
(pinning the same prefix again changes nothing). A chunk stays pinned while some pinned prefix
covers it, so two pinned documents that share a system prompt keep it pinned until both are
unpinned; `unpin_keys(keys)` removes the pins of `keys` and of every prefix of them.

The registry is the store's; each local tier only holds (`hold`/`unhold`) the pinned chunks it
has, within its bound (`pin_fraction` of its capacity; in DRAM also `pin_fraction` of each key
namespace's quota, so a tenant's quota always leaves it room to save). The disk tier holds all
of a pin's chunks it has, or refuses the pin (`PinRefused`, nothing pinned); so does DRAM for
the chunks no tier below holds pinned (not on disk, not pinned by a kvtier server: e.g. a
DRAM-only store). The chunks held below, DRAM holds head first as far as its bounds allow:
they are safe below it and promoted again when used. A chunk only a Redis remote has cannot be
pinned.

With a disk tier the registry is a journal in the disk directory (`pins`, fsynced at every
change, compacted at open), so pins survive a restart, clean or `kill -9`: the disk tier's pinned
chunks are held again at open, and a pinned chunk promoted into DRAM is held there too while
DRAM's bound allows. A kvtier server behind `remote` is sent PIN / UNPIN for the keys it owns
and keeps a registry of its own; a Redis remote is not asked (Redis evicts by its own policy).

Locks: `_pin_lock` serialises pins, unpins and the holds of pinned chunks arriving in a tier
(`_hold_if_pinned`: a save, write-behind or promotion), so no hold outlives its pin. Order:
`_pin_lock`, then a tier's lock; it is never taken while holding the store's `_cond` or a
tier's lock, and nothing holding it waits on `_cond` for background writes (a landing write
may take it).

`Pinning` is a part of `Store` (its base class); it uses the store's tiers and call
accounting, declared below.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.config import StoreConfig
from kvtier.errors import ConfigError, KvtierError, PinRefused
from kvtier.journal import Journal
from kvtier.keys import KEY_BYTES, Key
from kvtier.tiers.base import Tier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

log = logging.getLogger("kvtier.pins")
ADD, REMOVE = b"+", b"-"  # journal records: ADD + a prefix's keys, REMOVE + last keys
LocalTier = DramTier | DiskTier


class PinRegistry:
    """The pinned prefixes, by their last key, and how many of them cover each chunk; the
    owner serialises changes."""

    def __init__(self, path: Path | None) -> None:
        self._prefixes: dict[Key, tuple[Key, ...]] = {}
        self._counts: dict[Key, int] = {}
        self._journal = None if path is None else Journal(path, sync=True)
        if self._journal is not None:
            for record in self._journal.records:
                self._apply(record)
            self._journal.rewrite(ADD + b"".join(p) for p in self._prefixes.values())

    def __len__(self) -> int:
        return len(self._prefixes)

    def pinned(self, key: Key) -> bool:
        return key in self._counts

    def has(self, prefix: Sequence[Key]) -> bool:
        return bool(prefix) and prefix[-1] in self._prefixes

    def prefixes(self) -> list[tuple[Key, ...]]:
        return list(self._prefixes.values())

    def add(self, prefix: tuple[Key, ...]) -> None:
        if prefix and prefix[-1] not in self._prefixes:
            self._record(ADD + b"".join(prefix))

    def remove(self, keys: Sequence[Key]) -> tuple[int, list[Key]]:
        """Remove the pins of every prefix of `keys`: the longest removed (in chunks) and the
        chunks no pin covers any more."""
        lasts = [key for key in keys if key in self._prefixes]
        if not lasts:
            return 0, []
        removed = [self._prefixes[key] for key in lasts]
        self._record(REMOVE + b"".join(lasts))
        freed = {key for prefix in removed for key in prefix if key not in self._counts}
        return max(len(prefix) for prefix in removed), list(freed)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def _record(self, record: bytes) -> None:
        if self._journal is not None:
            self._journal.append(record)  # durable before it takes effect
        self._apply(record)

    def _apply(self, record: bytes) -> None:
        body = record[1:]
        if len(body) % KEY_BYTES:
            return
        keys = tuple(body[i : i + KEY_BYTES] for i in range(0, len(body), KEY_BYTES))
        if record[:1] == ADD and keys and keys[-1] not in self._prefixes:
            self._prefixes[keys[-1]] = keys
            for key in keys:
                self._counts[key] = self._counts.get(key, 0) + 1
        elif record[:1] == REMOVE:
            for last in keys:
                for key in self._prefixes.pop(last, ()):
                    left = self._counts[key] - 1
                    if left:
                        self._counts[key] = left
                    else:
                        del self._counts[key]


class Pinning:
    """The pin half of `Store`."""

    config: StoreConfig
    _tiers: tuple[Tier, ...]
    _cond: threading.Condition
    _writing: dict[Key, int]

    if TYPE_CHECKING:

        def _enter(self) -> None: ...
        def _leave(self, saved: int = 0) -> None: ...
        def _locate(self, keys: Sequence[Key], served_from: bool = False) -> Any: ...

    def _open_pins(self, disk: DiskTier | None) -> None:
        """Read the registry (with a disk tier) and hold its chunks in the disk tier again."""
        self._pin_lock = threading.Lock()
        self._pins = PinRegistry(None)  # until the journal is read
        path = None if disk is None else disk.root / "pins"
        try:
            self._pins = PinRegistry(path)
        except OSError as exc:
            raise ConfigError(f"disk_dir: cannot use the pins journal {path}: {exc}") from exc
        if disk is None:
            return
        refused = 0
        for prefix in self._pins.prefixes():
            refused += disk.hold(prefix, self._pin_bound(disk)) is None
        if refused:
            log.warning(
                "kvtier: %d pinned prefixes do not fit the disk tier's pin bound "
                "(pin_fraction=%s); they are evictable until unpinned or the bound is raised",
                refused,
                self.config.pin_fraction,
            )

    def pin_keys(self, keys: Sequence[Key]) -> int:
        """Pin the stored leading chunks of `keys` (waiting for their writes in flight) in
        every tier that holds them; how many chunks. Raises PinRefused (nothing pinned) when a
        tier's pinned bytes would pass its bound, KvtierError when a server cannot be asked."""
        self._enter()
        try:
            with self._cond:  # not under _pin_lock: a landing write may take it
                self._cond.wait_for(lambda: not any(k in self._writing for k in keys))
            with self._pin_lock:
                n = int(self._locate(keys).chunks)
                if n:
                    self._pin(tuple(keys[:n]))
                return n
        finally:
            self._leave()

    def unpin_keys(self, keys: Sequence[Key]) -> int:
        """Remove the pins of `keys` and of every prefix of them, here, then on the servers;
        the longest prefix unpinned, in chunks (0: none was pinned). Raises KvtierError when
        a server cannot be asked, after the local pins are removed (and the other servers
        asked): call it again once the server is back."""
        self._enter()
        try:
            with self._pin_lock:
                unpinned, freed = self._pins.remove(keys)
                for tier in self._local_tiers():
                    tier.unhold(freed)
                failed: KvtierError | None = None
                for server in self._pin_servers():
                    try:
                        unpinned = max(unpinned, int(server.unpin(keys)))
                    except KvtierError as exc:
                        failed = exc
                if failed is not None:
                    raise KvtierError(
                        f"unpin: the local pins are removed, but a server was not asked "
                        f"({failed}); its pins stay until you unpin again once it is back"
                    ) from failed
                return unpinned
        finally:
            self._leave()

    def _pin(self, prefix: tuple[Key, ...]) -> None:
        """Pin on the servers, hold in the disk tier, then in DRAM: all of the chunks no tier
        below holds pinned, the others head first as far as its bound allows; then record
        it. All undone if a step fails (a refusal, a server down, the journal's disk full)."""
        held: list[tuple[LocalTier, list[Key]]] = []
        asked: list[Any] = []
        safe: set[Key] = set()  # chunks a tier below DRAM holds pinned
        again = self._pins.has(prefix)  # then a failure leaves the servers' pins alone
        try:
            for server in self._pin_servers():
                safe.update(server.pin(prefix))
                asked += [] if again else [server]
            for tier in reversed(self._local_tiers()):  # disk first
                if isinstance(tier, DiskTier):
                    held.append((tier, self._hold_all(tier, prefix)))
                    safe.update(k for k in prefix if tier.contains_prefix([k]))
                    continue
                held.append((tier, self._hold_all(tier, [k for k in prefix if k not in safe])))
                held.append((tier, self._hold_head(tier, [k for k in prefix if k in safe])))
            self._pins.add(prefix)
        except BaseException:
            for server in asked:
                with contextlib.suppress(KvtierError):  # unreachable now: pinned till unpinned
                    server.unpin(prefix)
            for tier, keys in held:
                tier.unhold(keys)
            raise

    def _hold_all(self, tier: LocalTier, keys: Sequence[Key]) -> list[Key]:
        """Hold every chunk of `keys` the tier has; those newly held. PinRefused (none
        held) past the tier's bound."""
        got = self._hold(tier, keys)
        if got is None:
            raise self._refused(tier, keys)
        return got

    def _hold_head(self, tier: LocalTier, keys: Sequence[Key]) -> list[Key]:
        """Hold the leading chunks of `keys` that fit the tier's bound; those newly held."""
        held: list[Key] = []
        for key in keys:
            got = self._hold(tier, [key])
            if got is None:
                break
            held += got
        return held

    def _hold(self, tier: LocalTier, keys: Sequence[Key]) -> list[Key] | None:
        """`tier.hold` within the tier's bound (and in DRAM within the same share of each
        namespace's quota)."""
        if isinstance(tier, DramTier):
            return tier.hold(keys, self._pin_bound(tier), self.config.pin_fraction)
        return tier.hold(keys, self._pin_bound(tier))

    def _hold_if_pinned(self, tier: Tier, key: Key) -> None:
        """A pinned chunk that has just arrived in a local tier is held there too, if the
        tier's bound allows (it is held in the tier it came from either way). Checked again
        under `_pin_lock`, so no unpin comes between the check and the hold (the lock is
        taken for pinned chunks only: saves of others never wait for a pin's I/O)."""
        if isinstance(tier, LocalTier) and self._pins.pinned(key):
            with self._pin_lock:
                if self._pins.pinned(key):
                    self._hold(tier, [key])

    def _local_tiers(self) -> list[LocalTier]:
        return [t for t in self._tiers if isinstance(t, LocalTier)]

    def _pin_servers(self) -> list[Any]:
        """Lower tiers that take pins themselves (kvtier servers)."""
        return [t for t in self._tiers if hasattr(t, "pin") and hasattr(t, "unpin")]

    def _pin_bound(self, tier: LocalTier) -> int:
        return int(self.config.pin_fraction * tier.capacity_bytes)

    def _refused(self, tier: LocalTier, keys: Sequence[Key]) -> PinRefused:
        stats = tier.stats()
        fraction = self.config.pin_fraction
        fix = (
            "raise pin_fraction (StoreConfig, KVTIER_PIN_FRACTION, kvtier serve --pin-fraction)"
            f" or the {tier.name} tier's size, or unpin something (BoundCache.unpin)"
        )
        if not fraction:
            return PinRefused(f"pinning is off (pin_fraction=0); to pin, {fix}")
        quotas = isinstance(tier, DramTier) and any(
            u.limit_bytes is not None for u in tier.usage().values()
        )
        share = ", or a tenant's pinned bytes past pin_fraction of its DRAM quota"
        return PinRefused(
            f"pin refused: {len(keys)} chunks would take the {tier.name} tier's pinned "
            f"bytes past its bound of {self._pin_bound(tier)} (pin_fraction={fraction} of "
            f"{tier.capacity_bytes} bytes; {stats.pinned_bytes} bytes in "
            f"{stats.pinned_chunks} chunks pinned now){share if quotas else ''}; {fix}"
        )
